"""The sampling server's requests, strings in and checked values out (no TensorFlow, no CherryPy): the query
parameters of GET /, /sample.json and /stream and the JSON body of POST /generate become SampleSettings, each
refused with a one-line reason (the 400 answer); the settings a request was generated with become its JSON.
Every parameter is a sampling setting as settings.SETTINGS declares it; Limits holds what the server's flags add.
"""
import argparse
import dataclasses
import json
import re

from settings import (
    ANALYSIS_CELLS,
    ANALYSIS_TOP,
    MAX_ANALYSIS_CELLS,
    MAX_ANALYSIS_TOP,
    SETTINGS,
    SETTINGS_BY_HTTP,
    SampleSettings,
    pick_seed,
)

# The largest JSON body POST /generate reads: room for a prime of --max_prime characters each written as a
# 12-byte escaped surrogate pair, and the other fields.
JSON_BYTES_PER_PRIME_CHAR = 12
JSON_BODY_OVERHEAD = 4096
MAX_DIGITS = 20  # longer numbers are refused before int() spends time on them
SHOWN_VALUE_CHARS = 40  # a refused value is quoted in the reason up to this length
# Query parameters of GET / and GET /sample.json (and the fields of POST /generate): the sampling settings, by the
# names that settings.SETTINGS declares; their defaults are the original server's (Setting.served_default).
PARAMETERS = tuple(setting.http for setting in SETTINGS)
DEFAULT_PRIME = SETTINGS_BY_HTTP["prime"].served_default
DEFAULT_N = SETTINGS_BY_HTTP["n"].served_default
DEFAULT_SAMPLE_MODE = SETTINGS_BY_HTTP["sample_mode"].served_default


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the flags allow a request: the largest n, the longest prime, the default temperature."""
    max_n: int
    max_prime: int
    temperature: float

    @property
    def max_body(self):
        """The largest POST /generate body, in bytes (see JSON_BYTES_PER_PRIME_CHAR)."""
        return JSON_BYTES_PER_PRIME_CHAR * self.max_prime + JSON_BODY_OVERHEAD

    def describe(self, setting):
        """A setting's declaration as JSON (GET /settings), with what the flags make of it here: n from 1 to
        --max_n, the default temperature --temperature's, the prime at most --max_prime characters."""
        described = setting.describe()
        if setting.name == "n":
            described.update(default=min(DEFAULT_N, self.max_n), low=1, high=self.max_n)
        elif setting.name == "temperature":
            described.update(default=self.temperature)
        elif setting.name == "prime":
            described.update(high=self.max_prime)
        return described


def parse_request(params, limits):
    """Query parameters (CherryPy gives a str, or a list when repeated) -> SampleSettings.

    Raises ValueError with a one-line reason for an unknown or repeated parameter or a bad value.
    """
    unknown = [name for name in params if name not in PARAMETERS]
    if unknown:
        raise ValueError(f"unknown parameter {shown(unknown[0])}; the parameters are {', '.join(PARAMETERS)}")
    for name, value in params.items():
        if isinstance(value, list):
            raise ValueError(f"parameter {name} is given {len(value)} times; give it once")
    prime = params.get("prime", DEFAULT_PRIME)
    if len(prime) > limits.max_prime:
        raise ValueError(f"prime is {len(prime)} characters long; the limit is {limits.max_prime} (--max_prime)")
    values = {setting.name: parameter(params, setting, limits) for setting in SETTINGS if setting.name != "prime"}
    if values["seed"] is None:  # the server picks one, so that the answer says which seed repeats it
        values["seed"] = pick_seed()
    return SampleSettings(prime=prime, **values)


def parameter(params, setting, limits):
    """One setting's query parameter, read and checked as its declaration says, or its default when absent."""
    if setting.name == "n":  # never above --max_n
        return integer(params, "n", min(DEFAULT_N, limits.max_n), 1, limits.max_n, "--max_n")
    if setting.choices is not None:
        return choice(params, setting)
    if setting.kind is int:  # the sampler checks the top
        return integer(params, setting.http, setting.served_default, setting.low, None)
    default = limits.temperature if setting.name == "temperature" else setting.served_default
    return number(params, setting.http, default, setting.parse, setting.query_what or setting.what)


_DIGITS = re.compile(r"[0-9]{1,%d}" % MAX_DIGITS)


def integer(params, name, default, low, high, flag=None):
    """params[name] as an int in [low, high], or default when absent. high None: the sampler checks the top."""
    text = params.get(name)
    if text is None:
        return default
    if _DIGITS.fullmatch(text) and low <= int(text) and (high is None or int(text) <= high):
        return int(text)
    bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raise ValueError(f"{name} must be {bound}{f' ({flag})' if flag else ''}, got {shown(text)}")


def choice(params, setting):
    """A setting of few values (sample_mode) as one of its choices, or its default when absent."""
    text = params.get(setting.http)
    if text is None:
        return setting.served_default
    if text in {str(value) for value in setting.choices}:
        return int(text)
    raise ValueError(f"{setting.reason()}, got {shown(text)}")


def number(params, name, default, parse, what):
    """params[name] read by `parse` (one of cli's flag types), or default when absent; a value it refuses is a
    ValueError saying that `name` must be `what`."""
    text = params.get(name)
    if text is None:
        return default
    try:
        return parse(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"{name} must be {what}, got {shown(text)}") from None


def parse_json_request(body, limits):
    """A POST /generate body (bytes: a JSON object of PARAMETERS) -> SampleSettings; the values are checked as
    parse_request checks the query's, with the JSON types required (n an integer, temperature a number, ...).

    Raises ValueError with a one-line reason for malformed JSON, an unknown field or a bad value.
    """
    fields = json_object(body, '{"prime": "The", "n": 200}')
    params = {}
    for name, value in fields.items():
        if name not in PARAMETERS:
            raise ValueError(f"unknown field {shown(name)}; the fields are {', '.join(PARAMETERS)}")
        if name == "seed" and value is None:
            continue  # null: the server picks one
        kind = JSON_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name} must be a JSON {JSON_TYPE_NAMES[kind]}, got {shown(json.dumps(value))}")
        params[name] = value if isinstance(value, str) else repr(value)
    return parse_request(params, limits)


def json_object(body, example):
    """A request body (bytes) read as a JSON object (a dict); ValueError with a one-line reason for malformed JSON,
    a repeated field, or anything but an object (the reason shows `example`)."""
    try:
        fields = json.loads(body, parse_constant=refuse_constant, object_pairs_hook=unique_fields)
    except RecursionError:
        raise ValueError("the body is not valid JSON (nested too deeply)") from None
    except RepeatedField:
        raise
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"the body is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"the body must be a JSON object, like {example}")
    return fields


JSON_KINDS = {str: str, int: int, float: (int, float)}  # a float setting takes a JSON integer too
JSON_TYPES = {setting.http: JSON_KINDS[setting.kind] for setting in SETTINGS}
JSON_TYPE_NAMES = {str: "string", int: "integer", (int, float): "number"}


def refuse_constant(name):
    """json.loads' hook for NaN and Infinity, which JSON does not have."""
    raise ValueError(f"{name} is not a JSON number")


class RepeatedField(ValueError):
    """A JSON object names a field more than once."""


def unique_fields(pairs):
    """json.loads' hook for every JSON object (nested ones too): a dict of the (name, value) pairs; a name given
    twice is refused, as a repeated query parameter is (json.loads would keep the last value)."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        names = [name for name, _ in pairs]
        repeated = next(name for name in names if names.count(name) > 1)
        raise RepeatedField(f"field {shown(repeated)} is given {names.count(repeated)} times; give it once")
    return fields


def shown(value):
    """A value quoted for a one-line reason, cut short when long."""
    text = str(value)
    return repr(text) if len(text) <= SHOWN_VALUE_CHARS else repr(text[:SHOWN_VALUE_CHARS]) + "..."


def settings_json(request):
    """The settings a request was generated with, as the JSON answers name them."""
    return {setting.http: getattr(request, setting.name) for setting in SETTINGS}


# ----------------------------------------------------------------------------------------------------------
# POST /analyze: {"text": ..., "top": 5, "cells": 10, "layer": null}

ANALYZE_FIELDS = {"text": None, "top": ANALYSIS_TOP, "cells": ANALYSIS_CELLS, "layer": None}  # and their defaults
ANALYZE_RANGES = {"top": (1, MAX_ANALYSIS_TOP), "cells": (1, MAX_ANALYSIS_CELLS), "layer": (1, None)}


class TooLong(ValueError):
    """A text longer than the server analyzes (413, not 400)."""


def analyze_body_limit(max_chars):
    """The largest POST /analyze body, in bytes, for a text of at most `max_chars` characters."""
    return JSON_BYTES_PER_PRIME_CHAR * max_chars + JSON_BODY_OVERHEAD


def parse_analyze_request(body, max_chars):
    """A POST /analyze body -> {"text", "top", "cells", "layer"} (layer None: the last; the model checks the
    layer's top and the text's tokens). ValueError with a one-line reason; TooLong past `max_chars`."""
    fields = json_object(body, '{"text": "The cat", "top": 5}')
    for name, value in fields.items():
        if name not in ANALYZE_FIELDS:
            raise ValueError(f"unknown field {shown(name)}; the fields are {', '.join(ANALYZE_FIELDS)}")
    if not isinstance(fields.get("text"), str):
        raise ValueError('text must be a JSON string, the text to analyze, like {"text": "The cat"}')
    if len(fields["text"]) > max_chars:
        raise TooLong(f"text is {len(fields['text'])} characters long; the limit is {max_chars} (--max_analyze)")
    request = {**ANALYZE_FIELDS, **fields}
    for name, (low, high) in ANALYZE_RANGES.items():
        value = request[name]
        if value is None and name == "layer":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
            raise ValueError(f"{name} must be {bound}, got {shown(json.dumps(value))}")
    return request
