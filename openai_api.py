"""The OpenAI-compatible completions API of the sampling server (no TensorFlow, no CherryPy): a POST
/v1/completions body read into the SampleSettings of each choice, and the answers built as OpenAI's (legacy)
completions API documents them: completion objects, stream chunks, the model list and errors.

How OpenAI's fields map to ours (README: OpenAI-compatible API): prompt -> prime (a list of prompts: one set of
choices each), max_tokens -> n, temperature 0 -> argmax (sample_mode 0), any other temperature -> sample_mode 1 at
that temperature, top_p -> top_p, seed -> seed (choice j of a prompt draws with seed + j, as sample.py --num_samples
does), stop -> stop strings, frequency_penalty, presence_penalty and logprobs -> ours of the same names. A request's
text for a seed is the native API's for the same settings.
"""
import dataclasses
import json
import math
import numbers
import os
import secrets

from request_parsing import RepeatedField, refuse_constant, shown, unique_fields
from settings import (
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_SEED,
    MODE_ARGMAX,
    MODE_SAMPLE,
    SETTINGS_BY_HTTP,
    SampleSettings,
    pick_seed,
)
from token_logprobs import logprobs_json

COMPLETION = "text_completion"  # the object type of a completion and of its stream chunks
COMPLETION_ID_PREFIX = "cmpl-"
OWNED_BY = "char-rnn"  # the owner /v1/models names
# OpenAI's documented defaults and limits for the fields it shares with us.
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 2.0
MAX_STOPS = 4
MAX_CHOICES = 16  # prompts x n in one request: each choice holds a row of the batch (or a waiting place)
DONE_EVENT = b"data: [DONE]\n\n"
# The error types of OpenAI's error object, by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               503: "server_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "not_found"}
# Fields OpenAI documents that this server does not implement: refused unless given their "off" value.
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {})}


class APIError(ValueError):
    """A request refused, with what OpenAI's error object says: the HTTP status, the one-line message, the
    request field at fault (param) and a code."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else ERROR_CODES.get(status)

    def body(self):
        """OpenAI's error object, as JSON bytes."""
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status, message, param=None, code=None):
    """{"error": {"message", "type", "param", "code"}} as JSON bytes."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param,
                                 "code": code if code is not None else ERROR_CODES.get(status)}}).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A POST /v1/completions body, checked: the prompts, the settings every choice shares (its prime and seed
    set per choice by choices()), n choices a prompt, the stop strings, and how to answer."""
    prompts: tuple
    settings: SampleSettings
    n: int
    stops: tuple
    stream: bool = False
    echo: bool = False
    include_usage: bool = False

    def choices(self):
        """The SampleSettings of each choice, in OpenAI's order: prompt i's choice j is choice i * n + j, and draws
        with seed + j (the seed picked once when none was given)."""
        seed = self.settings.seed
        return [dataclasses.replace(self.settings, prime=prompt, seed=(seed + j) % (MAX_SEED + 1))
                for prompt in self.prompts for j in range(self.n)]


def parse_completion_request(body, model_name, max_n, max_prime):
    """A POST /v1/completions body (bytes) -> CompletionRequest; max_n and max_prime are the server's limits
    (--max_n, --max_prime).

    Raises APIError (400, naming the field at fault; 404 for another model's name).
    """
    fields = read_object(body)
    for name in fields:
        if name not in FIELDS and name not in UNSUPPORTED:
            raise APIError(400, f"unknown field {shown(name)}", param=name)
    for name, allowed in UNSUPPORTED.items():
        if name in fields and fields[name] not in allowed:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    if "model" not in fields:
        raise APIError(400, "model is required: the name GET /v1/models lists", param="model")
    model = text_field(fields, "model")
    if model != model_name:
        raise APIError(404, f"the model {shown(model)} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    if fields.get("user") is not None:
        text_field(fields, "user")
    prompts = read_prompts(fields, max_prime)
    n = integer_field(fields, "n", 1, 1, MAX_CHOICES // len(prompts))
    stream, echo = boolean_field(fields, "stream"), boolean_field(fields, "echo")
    settings = read_settings(fields, max_n)
    if echo and settings.logprobs:
        # OpenAI scores the prompt's tokens too; this server's loop scores only the tokens it generates.
        raise APIError(400, "echo with logprobs is not supported: the prompt's tokens are not scored", param="echo")
    return CompletionRequest(tuple(prompts), settings, n, read_stops(fields), stream, echo,
                             read_include_usage(fields, stream))


def read_object(body):
    """The body as a JSON object (a dict); APIError 400 otherwise."""
    try:
        fields = json.loads(body, parse_constant=refuse_constant, object_pairs_hook=unique_fields)
    except RepeatedField as error:
        raise APIError(400, str(error)) from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(fields, dict):
        raise APIError(400, 'the body must be a JSON object, like {"model": ..., "prompt": "The"}')
    return fields


def read_prompts(fields, max_prime):
    """The prompts: a string, or a list of 1 to MAX_CHOICES strings, each at most max_prime characters."""
    if "prompt" not in fields:
        raise APIError(400, "prompt is required: a string, or a list of strings", param="prompt")
    prompt = fields["prompt"]
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not 1 <= len(prompts) <= MAX_CHOICES:
        raise APIError(400, f"prompt must hold 1 to {MAX_CHOICES} prompts, got {len(prompts)}", param="prompt")
    for text in prompts:
        if not isinstance(text, str):
            raise APIError(400, "prompt must be a string or a list of strings (token ids are not taken: this "
                                "server's tokens are its own)", param="prompt")
        if len(text) > max_prime:
            raise APIError(400, f"prompt is {len(text)} characters long; the limit is {max_prime} (--max_prime)",
                           param="prompt")
    return prompts


def read_settings(fields, max_n):
    """The sampling settings every choice shares (its prime set per choice): max_tokens, temperature, top_p and
    seed mapped onto ours (module docstring)."""
    temperature = number_field(fields, "temperature", DEFAULT_TEMPERATURE, 0.0, MAX_TEMPERATURE)
    top_p = number_field(fields, "top_p", SampleSettings.top_p, 0.0, 1.0)
    if not SETTINGS_BY_HTTP["top_p"].valid(top_p):
        raise APIError(400, f"top_p must be {SETTINGS_BY_HTTP['top_p'].query_what}, got {top_p!r}", param="top_p")
    if temperature and not SETTINGS_BY_HTTP["temperature"].valid(temperature):  # a subnormal one
        raise APIError(400, f"temperature must be 0 or {SETTINGS_BY_HTTP['temperature'].what}, got {temperature!r}",
                       param="temperature")
    seed = integer_field(fields, "seed", None, 0, MAX_SEED)
    return SampleSettings(
        prime="", n=integer_field(fields, "max_tokens", min(DEFAULT_MAX_TOKENS, max_n), 0, max_n, "--max_n"),
        # Argmax reads no temperature; 1 keeps the settings within the check's limits.
        mode=MODE_SAMPLE if temperature else MODE_ARGMAX, temperature=temperature or DEFAULT_TEMPERATURE,
        seed=pick_seed() if seed is None else seed, top_p=top_p,
        frequency_penalty=number_field(fields, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        presence_penalty=number_field(fields, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        logprobs=integer_field(fields, "logprobs", 0, 0, MAX_LOGPROBS))


def read_stops(fields):
    """The stop strings: null, a string, or a list of up to MAX_STOPS non-empty strings."""
    stop = fields.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or any(not isinstance(text, str) or not text for text in stops)):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them",
                       param="stop")
    return tuple(stops)


def read_include_usage(fields, stream):
    """stream_options.include_usage: whether a stream ends with a chunk of the usage (only with stream)."""
    options = fields.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise APIError(400, "stream_options is only taken with stream: true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, 'stream_options must be {"include_usage": true or false}', param="stream_options")
    return boolean_field(options, "include_usage", "stream_options.include_usage")


def text_field(fields, name):
    value = fields[name]
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a string, got {shown(json.dumps(value))}", param=name)
    return value


def boolean_field(fields, name, param=None):
    """fields[name] as a bool (false when absent or null)."""
    value = fields.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {shown(json.dumps(value))}", param=param or name)
    return value


def integer_field(fields, name, default, low, high, flag=None):
    """fields[name] as an int in [low, high] (default when absent or null)."""
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        limit = f" ({flag})" if flag else ""
        raise APIError(400, f"{name} must be an integer from {low} to {high}{limit}, got "
                            f"{shown(json.dumps(value))}", param=name)
    return int(value)


def number_field(fields, name, default, low, high):
    """fields[name] as a float in [low, high] (default when absent or null)."""
    value = fields.get(name)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        raise APIError(400, f"{name} must be a number from {low:g} to {high:g}, got {shown(json.dumps(value))}",
                       param=name)
    return float(value)


# Every field a request may give (the unsupported ones are in UNSUPPORTED); user is taken and ignored.
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
          "echo", "frequency_penalty", "presence_penalty", "logprobs", "user")


# ----------------------------------------------------------------------------------------------------------
# Answers


def default_model_name(save_dir):
    """The model's name when --model_name gives none: the save dir's own name (its last path component)."""
    return os.path.basename(os.path.normpath(os.path.abspath(save_dir)))


def completion_id():
    """A new completion's id: cmpl- and 24 random hex digits."""
    return COMPLETION_ID_PREFIX + secrets.token_hex(12)


@dataclasses.dataclass
class Choice:
    """One choice's answer: its text (the prompt first with echo), its index, why it ended ("stop": at a stop
    string; "length": after max_tokens tokens), the tokens generated, and with logprobs their TokenLogprob (None
    without)."""
    text: str
    index: int
    finish_reason: str
    tokens: int
    details: list | None = None

    def as_json(self):
        return {"text": self.text, "index": self.index, "logprobs": logprobs_of(self.details),
                "finish_reason": self.finish_reason}


def logprobs_of(details):
    """A choice's (or a chunk's) logprobs object: OpenAI's legacy "tokens", "token_logprobs", "top_logprobs" (a
    {token: logprob} object per token) and "text_offset" (where each token begins in the prompt and text), or None
    when no logprobs were asked (details None)."""
    return None if details is None else logprobs_json(details)


def usage(prompt_tokens, completion_tokens):
    """OpenAI's usage object, in this model's tokens (characters, or words at word level)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(answer_id, created, model, choices, prompt_tokens):
    """The answer of a request without stream: a text_completion object."""
    return {"id": answer_id, "object": COMPLETION, "created": created, "model": model,
            "choices": [choice.as_json() for choice in choices],
            "usage": usage(prompt_tokens, sum(choice.tokens for choice in choices))}


def chunk(answer_id, created, model, index, text, finish_reason=None, details=None):
    """One stream chunk: a piece of choice `index`'s text (with logprobs, the TokenLogprob of the tokens that begin
    in it), or its end (finish_reason given, text empty)."""
    return {"id": answer_id, "object": COMPLETION, "created": created, "model": model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs_of(details),
                         "finish_reason": finish_reason}]}


def usage_chunk(answer_id, created, model, prompt_tokens, completion_tokens):
    """The last chunk of a stream asked with stream_options.include_usage: no choices, the usage."""
    return {"id": answer_id, "object": COMPLETION, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def server_sent(data):
    """One Server-Sent Event of OpenAI's streams: a data line of JSON (the stream ends with DONE_EVENT)."""
    return f"data: {json.dumps(data)}\n\n".encode("utf-8")


def model_object(name, created):
    """The model served, as /v1/models describes a model."""
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}


def model_list(name, created):
    """GET /v1/models: OpenAI's list of one model."""
    return {"object": "list", "data": [model_object(name, created)]}
