"""The log-probabilities reported with a sample (settings.logprobs > 0): one TokenLogprob per generated token, and
their JSON (no TensorFlow, no other project module).

Each logprob is the natural log of the token's probability under the model's own softmax at temperature 1: before
the penalties, the temperature, top-k and top-p, so it says how surprising the model found the token, whatever
sampled it. The sampler computes them in its compiled loop (sampler.Generator), the text side pairs them with the
text (sample_text.SampleText), and sample.py --json, the server's JSON answers and its /stream events write them as
logprobs_json does.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability, and the likeliest alternatives at its place as (token,
    logprob) pairs, likeliest first (settings.logprobs of them; the token itself among them when it is one of the
    likeliest). text_offset: where the token begins in the sample's text, the prime included (OpenAI's
    text_offset), in code points."""
    token: str
    logprob: float
    top: list
    text_offset: int = 0


def logprobs_json(details):
    """A list of TokenLogprob as one JSON object, in the field names of OpenAI's completions: "tokens",
    "token_logprobs", "top_logprobs" (a {token: logprob} object per token, likeliest first) and "text_offset"."""
    return {"tokens": [detail.token for detail in details],
            "token_logprobs": [detail.logprob for detail in details],
            "top_logprobs": [dict(detail.top) for detail in details],
            "text_offset": [detail.text_offset for detail in details]}


def pieces_json(details):
    """A list of TokenLogprob as the compact JSON of a /stream event: [[token, logprob, [[token, logprob], ...],
    text_offset], ...] (the page shows them on hover)."""
    return [[detail.token, detail.logprob, [list(pair) for pair in detail.top], detail.text_offset]
            for detail in details]
