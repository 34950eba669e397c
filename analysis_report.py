"""The HTML report of an analysis (analysis.py's JSON data): one self-contained file, nothing loaded from
elsewhere, made of web/analysis.html with web/analysis.js (the renderer the server's page uses too) and the data
inlined. The report shows the first REPORT_MAX_TOKENS tokens and says so when the text is longer; the summary
above them (bits per token, lines, cells) covers the whole text. No TensorFlow."""
import html
import json
import os
import re

from files import atomic_write_bytes
from settings import REPORT_MAX_TOKENS

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
TEMPLATE = os.path.join(WEB_DIR, "analysis.html")
SCRIPT = os.path.join(WEB_DIR, "analysis.js")
PLACEHOLDER = re.compile(r"/\*ANALYSIS_(TITLE|JS|DATA)\*/")  # where the template takes the title, script and data


def inline_json(data):
    """JSON that can stand inside a <script> element: every "<" escaped, so that no "</script>" or "<!--" in the
    text ends or changes the script."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def report_html(data, window=REPORT_MAX_TOKENS):
    """The report's HTML (a str) for an analysis' data (with "source" and "checkpoint" added), showing its first
    `window` tokens."""
    shown = {**data, "positions": data["positions"][:window]}
    with open(TEMPLATE, encoding="utf-8") as template, open(SCRIPT, encoding="utf-8") as script:
        page, renderer = template.read(), script.read()
    parts = {"TITLE": html.escape(os.path.basename(str(data["source"]))), "JS": renderer, "DATA": inline_json(shown)}
    # One pass, so that a placeholder's text inside the data is left as it is.
    return PLACEHOLDER.sub(lambda match: parts[match.group(1)], page)


def write_report(path, data, window=REPORT_MAX_TOKENS):
    """Write the report to `path` (whole or not at all)."""
    atomic_write_bytes(path, report_html(data, window).encode("utf-8"))
