"""web/ui.html in a real browser: headless Chromium driven by selenium against a sample_server.py process.

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`; .ci/run installs them
when missing). Without them these tests fail saying so; CHAR_RNN_NO_BROWSER=1 skips them instead.
"""
import contextlib
import json
import math
import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import REPO
from servers import REQUEST_TIMEOUT_S, get, post_json, running_server

pytestmark = pytest.mark.slow

BROWSER_PROGRAMS = ("chromium", "chromedriver")  # Debian's chromium and chromium-driver, in /usr/bin
SCREENSHOTS = os.path.join(REPO, "tests", "screenshots")
PHONE = (390, 844)
DESKTOP = (1200, 900)
# The conftest model learned lower-case text only: the prime must be made of its characters.
SETTINGS = {"prime": "the ", "n": 60, "sample_mode": 1, "temperature": 0.8, "top_k": 0, "seed": 7}
GENERATION_TIMEOUT_S = 120  # the first generation compiles its block; a busy machine starves the browser too


API_KEY = "sk-browser-key"


def browser_server(request, tmp_path_factory, name, env=None):
    """A server on conftest's tiny model; none without a browser (the test then fails at once in chromium())."""
    if missing_programs():
        yield None
        return
    save_dir = request.getfixturevalue("trained_save_dir")
    log_path = str(tmp_path_factory.mktemp(name) / "server.log")
    with running_server(save_dir, log_path, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    yield from browser_server(request, tmp_path_factory, "browser-server")


@pytest.fixture(scope="module")
def keyed_server(request, tmp_path_factory):
    """A server that needs an API key (CHAR_RNN_API_KEYS)."""
    yield from browser_server(request, tmp_path_factory, "keyed-server", env={"CHAR_RNN_API_KEYS": API_KEY})


def missing_programs():
    return [name for name in BROWSER_PROGRAMS if shutil.which(name) is None]


def browser_paths():
    """(chromium, chromedriver) as Debian installs them; fails (or skips with CHAR_RNN_NO_BROWSER=1) without them."""
    missing = missing_programs()
    if missing:
        reason = (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                  "(apt-get install -y chromium chromium-driver; .ci/run does)")
        if os.environ.get("CHAR_RNN_NO_BROWSER") == "1":
            pytest.skip(f"CHAR_RNN_NO_BROWSER=1: {reason}")
        pytest.fail(f"{reason}, or set CHAR_RNN_NO_BROWSER=1 to skip the browser tests")
    return tuple(map(shutil.which, BROWSER_PROGRAMS))


@contextlib.contextmanager
def chromium(width, height, phone=False):
    """Headless Chromium; `phone` emulates a mobile screen of that size (a desktop window is at least 500 px wide,
    and a mobile one lays the page out at the width its <meta name="viewport"> asks for)."""
    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        if phone:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
        yield driver
    finally:
        driver.quit()


def open_page(driver, server):
    status, headers, body = get(server.url + "/ui")
    assert (status, headers.get_content_type()) == (200, "text/html"), (status, body[:200])
    with open(os.path.join(REPO, "web", "ui.html"), encoding="utf-8") as f:
        assert body == f.read()
    driver.get(server.url + "/ui")
    WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "health").text.startswith("ok: "),
                                                   "the page did not show GET /health's answer")
    assert state(driver) == "idle"


def element(driver, id_):
    return driver.find_element(By.ID, id_)


def state(driver):
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def fill(driver, **values):
    for name, value in values.items():
        field = element(driver, "seed_input" if name == "seed" else name)
        if field.tag_name == "select":
            field.find_element(By.CSS_SELECTOR, f"option[value='{value}']").click()
        else:
            field.clear()
            field.send_keys(str(value))


def wait_for_the_end(driver):
    """Waits until the page says done or error; returns which."""
    WebDriverWait(driver, GENERATION_TIMEOUT_S).until(lambda d: state(d) in ("done", "error"),
                                                      "the page did not say done or error")
    return state(driver)


def post_generate(server, settings):
    """The text POST /generate answers for these settings."""
    status, _, answer = post_json(server.url + "/generate", dict(settings, top_p=1.0))
    assert status == 200, f"POST /generate answered {status}: {answer}\nserver log:\n{server.log()[-3000:]}"
    return answer["text"]


def screenshot(driver, name):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    assert driver.save_screenshot(os.path.join(SCREENSHOTS, name))


def test_at_phone_width_the_page_streams_what_post_generate_answers_for_the_same_seed(server):
    with chromium(*PHONE, phone=True) as driver:
        open_page(driver, server)
        fill(driver, **SETTINGS)
        element(driver, "generate").click()
        assert wait_for_the_end(driver) == "done", element(driver, "error").text
        expected = post_generate(server, SETTINGS)
        # textContent: the text as streamed, whitespace and newlines included (.text would trim and reflow them).
        assert element(driver, "output").get_attribute("textContent") == expected
        assert element(driver, "seed").text == "seed 7"
        assert not element(driver, "error").is_displayed()
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []

        # The page is laid out for the phone's width (its viewport meta tag), with nothing wider.
        width, scroll_width = driver.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]")
        assert width == PHONE[0] and scroll_width <= width
        button = element(driver, "generate")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        assert button.is_displayed() and button.is_enabled()
        assert 0 <= button.rect["x"] and button.rect["x"] + button.rect["width"] <= width
        screenshot(driver, "ui.png")

        fill(driver, seed="")
        element(driver, "use_seed").click()
        assert element(driver, "seed_input").get_attribute("value") == "7"


def test_a_refused_setting_shows_the_servers_one_line_reason_and_no_text(server):
    with chromium(*DESKTOP) as driver:
        open_page(driver, server)
        fill(driver, **dict(SETTINGS, temperature=-1))
        element(driver, "generate").click()
        assert wait_for_the_end(driver) == "error"
        reason = element(driver, "error").text
        assert element(driver, "error").is_displayed() and "temperature" in reason and "\n" not in reason
        assert element(driver, "output").get_attribute("textContent") == ""
        assert not element(driver, "result").is_displayed()
        screenshot(driver, "ui-error.png")

        # Enter in a number field generates again; the error goes once the setting is right.
        fill(driver, temperature=0.8)
        element(driver, "temperature").send_keys(Keys.ENTER)
        assert wait_for_the_end(driver) == "done", element(driver, "error").text
        assert not element(driver, "error").is_displayed()
        assert element(driver, "output").get_attribute("textContent") == post_generate(server, SETTINGS)
        screenshot(driver, "ui-wide.png")


def test_the_page_has_a_field_for_every_declared_setting_and_its_top_p_gives_the_json_apis_text(server):
    with chromium(*DESKTOP) as driver:
        open_page(driver, server)
        status, _, body = get(server.url + "/settings")
        assert status == 200
        for setting in json.loads(body):
            assert element(driver, "seed_input" if setting["name"] == "seed" else setting["name"]).is_displayed()
        nucleus = dict(SETTINGS, top_p=0.3)
        fill(driver, **nucleus)
        element(driver, "generate").click()
        assert wait_for_the_end(driver) == "done", element(driver, "error").text
        status, _, answer = post_json(server.url + "/generate", nucleus)
        assert status == 200, answer
        assert element(driver, "output").get_attribute("textContent") == answer["text"]
        assert answer["text"] != post_generate(server, SETTINGS)  # top_p reached the generator
        screenshot(driver, "ui-top-p.png")


def give_key(driver, key, reason, shot=None):
    """Wait for the page to ask for the API key with `reason`, and give it `key` (a screenshot first if named)."""
    WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "key_form").is_displayed(),
                                                   "the page did not ask for the API key")
    assert reason in element(driver, "key_reason").text
    if shot:
        screenshot(driver, shot)
    element(driver, "api_key").send_keys(key, Keys.ENTER)


def test_with_api_keys_the_page_asks_for_the_key_once_and_streams_with_it(keyed_server):
    with chromium(*DESKTOP) as driver:
        driver.get(keyed_server.url + "/ui")  # the page itself needs no key
        give_key(driver, "sk-wrong", "needs an API key", shot="ui-key.png")
        give_key(driver, API_KEY, "refused this key")  # a wrong key is asked for again
        WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "health").text.startswith("ok: "),
                                                       "the page did not show GET /health's answer")
        assert not element(driver, "key_form").is_displayed()
        fill(driver, **SETTINGS)
        element(driver, "generate").click()
        assert wait_for_the_end(driver) == "done", element(driver, "error").text
        status, _, answer = post_json(keyed_server.url + "/generate", dict(SETTINGS, top_p=1.0),
                                      headers={"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, answer
        assert element(driver, "output").get_attribute("textContent") == answer["text"]
        # The tab keeps the key: a reload asks for nothing.
        driver.refresh()
        WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "health").text.startswith("ok: "),
                                                       "the page did not show GET /health's answer after a reload")
        assert not element(driver, "key_form").is_displayed()
        assert driver.execute_script("return sessionStorage.getItem('char-rnn-api-key')") == API_KEY
        # The Analyze view sends the key too, and its drawing script (/analysis.js) loads without one.
        analyze_in_page(driver)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".an-text span")) == len(ANALYZED_TEXT)


def test_hovering_a_generated_character_shows_its_probability_and_the_likeliest_alternatives(server):
    with chromium(*DESKTOP) as driver:
        open_page(driver, server)
        fill(driver, **SETTINGS)
        assert element(driver, "logprobs").get_attribute("value") == "5"  # the page asks for the alternatives
        element(driver, "generate").click()
        assert wait_for_the_end(driver) == "done", element(driver, "error").text
        status, _, answer = post_json(server.url + "/generate", dict(SETTINGS, logprobs=5))
        assert status == 200, answer
        assert element(driver, "output").get_attribute("textContent") == answer["text"]
        tokens = driver.find_elements(By.CSS_SELECTOR, "#output .token")
        assert [token.get_attribute("textContent") for token in tokens] == answer["logprobs"]["tokens"]
        position = 7
        ActionChains(driver).move_to_element(tokens[position]).perform()
        WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "tip").is_displayed(),
                                                       "hovering a token showed no probabilities")
        lines = element(driver, "tip").get_attribute("textContent").split("\n")
        token, probability = lines[0].rsplit(" ", 1)
        assert json.loads(token) == answer["logprobs"]["tokens"][position]
        expected = 100 * math.exp(answer["logprobs"]["token_logprobs"][position])
        assert float(probability.rstrip("%")) == pytest.approx(expected, abs=0.06)
        alternatives = [line.strip().rsplit(" ", 1) for line in lines[2:]]
        top = answer["logprobs"]["top_logprobs"][position]
        assert [json.loads(text) for text, _ in alternatives] == list(top)  # the likeliest first
        for (_, shown), logprob in zip(alternatives, top.values(), strict=True):
            assert float(shown.rstrip("%")) == pytest.approx(100 * math.exp(logprob), abs=0.06)
        screenshot(driver, "ui-hover.png")
        ActionChains(driver).move_to_element(element(driver, "generate")).perform()
        WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: not element(d, "tip").is_displayed(),
                                                       "the probabilities stayed after the pointer left")


# ----------------------------------------------------------------------------------------------------------
# The analysis: analyze.py's HTML report, and the page's Analyze view (POST /analyze)

ANALYZED_TEXT = "the cat sat on the log.\nthe dog sat on the mat.\n"  # characters the conftest model knows


def span_colours(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('.an-text span')].map((span) => span.style.backgroundColor)")


def check_analysis_view(driver, data, text):
    """One span per character, coloured; hovering one shows its probability and alternatives; choosing a cell
    recolours the spans."""
    spans = driver.find_elements(By.CSS_SELECTOR, ".an-text span")
    assert len(spans) == len(text) and "".join(span.get_attribute("textContent") for span in spans) == text
    by_surprise = span_colours(driver)
    assert all(by_surprise) and len(set(by_surprise)) > 3
    ActionChains(driver).move_to_element(spans[5]).perform()
    tip = element(driver, "an-tip")
    WebDriverWait(driver, 10).until(lambda d: tip.is_displayed(), "hovering a character showed nothing")
    entry = data["positions"][5]
    assert f"p = {entry['probability']}" in tip.text
    alternatives = tip.text.split("likeliest:")[1].strip().splitlines()
    shown = [line.rsplit(None, 1)[0].strip() for line in alternatives]  # each line: the token quoted, then its p
    assert shown == [json.dumps(token) for token, _ in entry["alternatives"]]
    cell = data["cells"][0]
    driver.find_element(By.CSS_SELECTOR, f".an-cells button[data-cell='{cell['cell']}']").click()
    by_cell = span_colours(driver)
    assert by_cell != by_surprise and len(set(by_cell)) > 3
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", spans[5])
    ActionChains(driver).move_to_element(spans[5]).perform()  # for the screenshot: the cell's colours and a tooltip


def test_the_report_colours_every_character_shows_its_alternatives_and_a_cells_activation(trained_save_dir,
                                                                                           tmp_path):
    import analyze
    source, page, out = tmp_path / "text.txt", tmp_path / "report.html", tmp_path / "analysis.json"
    source.write_text(ANALYZED_TEXT, encoding="utf-8")
    assert analyze.main(["--save_dir", trained_save_dir, str(source), "--html", str(page), "--json", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    with chromium(*DESKTOP) as driver:
        driver.get(page.as_uri())
        check_analysis_view(driver, data, ANALYZED_TEXT)
        assert [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"] == []
        screenshot(driver, "analysis-report.png")


def analyze_in_page(driver):
    """Open the page's Analyze view, analyze ANALYZED_TEXT, and wait for its coloured text (an error fails)."""
    driver.find_element(By.CSS_SELECTOR, "#analyze_view summary").click()
    element(driver, "analyze_text").send_keys(ANALYZED_TEXT)
    element(driver, "analyze_button").click()
    WebDriverWait(driver, GENERATION_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".an-text span") or element(d, "analyze_error").is_displayed(),
        "the Analyze view showed neither a text nor an error")
    assert not element(driver, "analyze_error").is_displayed(), element(driver, "analyze_error").text


def test_the_analyze_view_colours_the_text_post_analyze_analyzed(server):
    with chromium(*DESKTOP) as driver:
        open_page(driver, server)
        analyze_in_page(driver)
        status, _, data = post_json(server.url + "/analyze", {"text": ANALYZED_TEXT})
        assert status == 200, data
        check_analysis_view(driver, data, ANALYZED_TEXT)
        screenshot(driver, "ui-analyze.png")

        # A refused text shows the server's one-line reason.
        element(driver, "analyze_text").send_keys("zebra")
        element(driver, "analyze_button").click()
        WebDriverWait(driver, REQUEST_TIMEOUT_S).until(lambda d: element(d, "analyze_error").is_displayed())
        assert "'z'" in element(driver, "analyze_error").text
