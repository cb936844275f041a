"""[S] A server that can face a network: what a hostile or careless client can make it do.

One real `run_mindformer.py --run_mode serve` process (the tiny model) with API keys (a flag and a key file),
one allowed browser origin and the default media policy (public addresses only), driven with the official
`openai` client, httpx and raw sockets. A local image server on 127.0.0.1 records every path it is asked for:
the proof that a refused URL was never fetched. The media policy's address rule is checked against a
hand-written table (the RFCs' special ranges), its redirect and resolution behaviour in-process against the
same image server.
"""
import json
import os
import re
import socket
import time

import pytest

from helpers import IMAGES, RUN, ImageServer, ServerProcess, free_port, image_part, run_cli, text_part

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

CAT = os.path.join(IMAGES, "chelsea.jpg")
KEY_FLAG, KEY_FILE_1, KEY_FILE_2 = "sk-flag-1", "sk-file-2", "sk-file-3"
GOOD_ORIGIN = "http://app.example"


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def images():
    server = ImageServer(CAT)
    yield server
    server.close()


@pytest.fixture(scope="module")
def secure(setup):
    keys = setup["dir"] / "keys.txt"
    keys.write_text(f"# the team's keys\n{KEY_FILE_1}\n\n  {KEY_FILE_2}  \n")
    s = ServerProcess(setup["yaml"], setup["ckpt"], str(setup["dir"] / "out_secure"), "--api_key", KEY_FLAG,
                      "--api_key_file", str(keys), "--allowed_origins", GOOD_ORIGIN, "--shutdown_grace_s", "0.5",
                      private_media=False)
    s.client = openai.OpenAI(base_url=s.base + "/v1", api_key=KEY_FLAG, max_retries=0, timeout=120)
    yield s
    s.close()


def post(server, body, key=KEY_FLAG, headers=None, path="/v1/chat/completions", **kw):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    if isinstance(body, (bytes, str)):
        return httpx.post(server.base + path, content=body, headers=h, timeout=60, **kw)
    return httpx.post(server.base + path, json=body, headers=h, timeout=60, **kw)


def raw(server, request: bytes):
    """Send bytes on a fresh socket; (status, headers text, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


def healthy(server):
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200
    assert "Traceback" not in server.stderr()


def rss_kb(server):
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


# ------------------------------------------------------------------------------- the media policy's address rule
# (address, allowed by default, allowed with --allow_private_media): RFC 1918/4193/6598/6890 by hand
ADDRESSES = [
    ("8.8.8.8", True, True), ("2606:4700:4700::1111", True, True),
    ("127.0.0.1", False, True), ("127.255.0.9", False, True), ("::1", False, True),
    ("10.1.2.3", False, True), ("172.16.0.1", False, True), ("192.168.1.1", False, True),
    ("100.64.0.1", False, True), ("fc00::1", False, True), ("fd12:3456::1", False, True),
    ("::ffff:127.0.0.1", False, True), ("::ffff:10.0.0.1", False, True), ("::ffff:8.8.8.8", True, True),
    ("2002:7f00:1::", False, True), ("2002:808:808::", True, True), ("64:ff9b::a00:1", False, True),
    ("169.254.169.254", False, False), ("fe80::1", False, False), ("0.0.0.0", False, False), ("::", False, False),
    ("224.0.0.251", False, False), ("ff02::1", False, False), ("255.255.255.255", False, False),
    ("240.0.0.1", False, False), ("::ffff:169.254.169.254", False, False),
]


@pytest.mark.parametrize("address,public,private", ADDRESSES, ids=[a[0] for a in ADDRESSES])
def test_the_address_rule(address, public, private):
    from media_policy import MediaPolicy
    assert MediaPolicy().address_allowed(address) is public
    assert MediaPolicy(private=True).address_allowed(address) is private


def test_every_redirect_hop_is_checked_before_connecting(images):
    """A hop to a host outside the allow-list, or to an address the policy refuses, is never requested."""
    from image_loading import load_image
    from media_policy import FetchError, MediaPolicy
    port = images.httpd.server_address[1]
    listed = MediaPolicy(private=True, domains=("localhost",))
    before = len(images.seen)
    with pytest.raises(FetchError, match="not in --allowed_media_domains"):
        load_image(f"http://localhost:{port}/redirect?to=http://127.0.0.1:{port}/cat.jpg", policy=listed)
    assert [p.split("?")[0] for p in images.seen[before:]] == ["/redirect"]

    class OnlyThisOne(MediaPolicy):      # 127.0.0.1 is "public" here, every other address is not
        def address_allowed(self, address):
            return address == "127.0.0.1"

    before = len(images.seen)
    with pytest.raises(FetchError, match="127.0.0.2: not a public address"):
        load_image(f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.2:{port}/cat.jpg", policy=OnlyThisOne())
    assert [p.split("?")[0] for p in images.seen[before:]] == ["/redirect"]
    # and a hop that is allowed is followed
    img = load_image(f"http://127.0.0.1:{port}/redirect?to=/cat.jpg", policy=OnlyThisOne())
    assert img.size == load_image(CAT).size


def test_redirects_are_bounded(images):
    from image_loading import load_image
    from media_policy import FetchError, MediaPolicy
    with pytest.raises(FetchError, match="not followed"):
        load_image(images.url("/redirect?to=/cat.jpg"), policy=MediaPolicy(private=True, redirects=0))
    before = len(images.seen)
    with pytest.raises(FetchError, match="too many redirects"):
        load_image(images.url("/loop.jpg"), policy=MediaPolicy(private=True, redirects=2))
    assert len(images.seen) - before == 3        # the first request and two hops, no more


def test_the_connection_goes_to_the_address_that_was_checked(images, monkeypatch):
    """DNS rebinding: the name resolves to the image server once, then (for anyone asking again) to an
    address that swallows packets. The download connects to the first answer: one resolution, no second."""
    from image_loading import load_image
    from media_policy import MediaPolicy
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, *args, **kw):
        if host == "rebind.test":
            calls.append(port)
            return real("127.0.0.1" if len(calls) == 1 else "10.255.255.1", port, *args, **kw)
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = images.httpd.server_address[1]
    img = load_image(f"http://rebind.test:{port}/cat.jpg", timeout=3, policy=MediaPolicy(private=True))
    assert img.size == load_image(CAT).size and len(calls) == 1


def test_image_urls_can_be_turned_off(images):
    from image_loading import load_image
    from llava_errors import LlavaError
    from media_policy import FetchError, MediaPolicy
    before = len(images.seen)
    with pytest.raises(LlavaError, match="turned off") as e:
        load_image(images.url("/cat.jpg"), policy=MediaPolicy.from_args(allow_urls=False, allow_private=True))
    assert not isinstance(e.value, FetchError) and len(images.seen) == before
    assert load_image("data:image/png;base64," + _png_b64()).size == (1, 1)   # data: URLs still work


def _png_b64():
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------ the server's fetch policy
def _internal_urls(images):
    port = images.httpd.server_address[1]
    return [
        ("loopback", f"http://127.0.0.1:{port}/cat.jpg"),
        ("localhost", f"http://localhost:{port}/cat.jpg"),
        ("ipv6_loopback", f"http://[::1]:{port}/cat.jpg"),
        ("unspecified", f"http://0.0.0.0:{port}/cat.jpg"),
        ("decimal_ip", f"http://2130706433:{port}/cat.jpg"),
        ("hex_ip", f"http://0x7f000001:{port}/cat.jpg"),
        ("short_ip", f"http://127.1:{port}/cat.jpg"),
        ("user_at_host", f"http://user:secret@127.0.0.1:{port}/cat.jpg"),
        ("mapped_ipv6", f"http://[::ffff:127.0.0.1]:{port}/cat.jpg"),
        ("https_loopback", f"https://127.0.0.1:{port}/cat.jpg"),
        ("redirector_itself", f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.1:{port}/cat.jpg"),
        ("stalling_service", f"http://127.0.0.1:{port}/stall.jpg"),
        ("closed_port", f"http://127.0.0.1:{free_port()}/x.jpg"),
        ("private_network", "http://10.255.255.1/x.jpg"),
        ("cloud_metadata", "http://169.254.169.254/latest/meta-data/"),
    ]


def test_internal_addresses_are_refused_alike_and_never_fetched(secure, images):
    """Every internal form is refused before any connection, in the same words (the URL aside), fast: the
    server is neither a proxy into its network nor a port scanner."""
    before = len(images.seen)
    shapes = set()
    for name, url in _internal_urls(images):
        start = time.monotonic()
        r = post(secure, {"messages": _user(image_part(url), text_part("?")), "max_tokens": 2})
        took = time.monotonic() - start
        assert r.status_code == 400, (name, r.text)
        error = r.json()["error"]
        assert error["param"] == "messages[0].content[0].image_url.url" and error["code"] == "image_fetch_failed"
        assert "could not be fetched" in error["message"] and "secret" not in r.text, (name, error)
        shapes.add(error["message"].split(": ", 1)[1])
        assert took < 3, (name, took)
    assert len(shapes) == 1, shapes
    assert images.seen[before:] == []
    log = secure.stderr()
    assert "not a public address" in log and "secret" not in log
    healthy(secure)


# ------------------------------------------------------------------------------------------------------ keys
def test_keys_from_the_flag_and_the_file_open_the_api(secure):
    for key in (KEY_FLAG, KEY_FILE_1, KEY_FILE_2):
        r = httpx.get(secure.base + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny", key
    reply = secure.client.chat.completions.create(model="tiny", messages=_user(text_part("Hi")), max_tokens=3)
    assert reply.usage.completion_tokens >= 1


# (case, headers, path)
UNAUTHORIZED = [
    ("no_key", {}, "/v1/models"),
    ("wrong_key", {"Authorization": "Bearer sk-nope"}, "/v1/models"),
    ("key_prefix", {"Authorization": f"Bearer {KEY_FLAG[:-1]}"}, "/v1/models"),
    ("not_bearer", {"Authorization": f"Basic {KEY_FLAG}"}, "/v1/models"),
    ("metrics", {}, "/metrics"),
    ("limits", {}, "/limits"),
]


@pytest.mark.parametrize("name,headers,path", UNAUTHORIZED, ids=[c[0] for c in UNAUTHORIZED])
def test_without_a_valid_key_the_answer_is_openai_s_401(name, headers, path, secure):
    r = httpx.get(secure.base + path, headers=headers)
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEY_FLAG not in r.text and KEY_FILE_1 not in r.text


def test_the_official_client_with_a_wrong_key_gets_authentication_error(secure):
    wrong = openai.OpenAI(base_url=secure.base + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=_user(text_part("Hi")), max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_health_and_the_page_stay_open(secure):
    for path in ("/health", "/", "/static/app.js"):
        assert httpx.get(secure.base + path).status_code == 200, path


# ------------------------------------------------------------------------------------------- browser safety
# (case, Content-Type or None) of a valid JSON body: what a web page can send anywhere without a preflight
NOT_JSON = [("text_plain", "text/plain"), ("form", "application/x-www-form-urlencoded"),
            ("multipart", "multipart/form-data; boundary=x"), ("none", None), ("json_lookalike", "text/json")]


@pytest.mark.parametrize("name,kind", NOT_JSON, ids=[c[0] for c in NOT_JSON])
def test_bodies_that_are_not_application_json_are_415(name, kind, secure):
    body = json.dumps({"messages": _user(text_part("Hi")), "max_tokens": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{secure.port}\r\nAuthorization: Bearer "
            f"{KEY_FLAG}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            + (f"Content-Type: {kind}\r\n" if kind else "") + "\r\n")
    status, _, answer = raw(secure, head.encode() + body)
    assert status == 415, answer
    assert json.loads(answer)["error"]["code"] == "unsupported_media_type"


def test_json_with_a_charset_is_accepted(secure):
    r = post(secure, json.dumps({"messages": _user(text_part("Hi")), "max_tokens": 2}),
             headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


# (case, Host header, status)
HOSTS = [("rebinding_name", "attacker.example", 400), ("rebinding_name_port", "attacker.example:{port}", 400),
         ("localhost", "localhost:{port}", 200), ("loopback_ip", "127.0.0.1:{port}", 200),
         ("ipv6_literal", "[::1]:{port}", 200), ("localhost_dot", "localhost.", 200)]


@pytest.mark.parametrize("name,host,status", HOSTS, ids=[c[0] for c in HOSTS])
def test_the_host_header_must_name_this_server(name, host, status, secure):
    host = host.format(port=secure.port)
    code, _, body = raw(secure, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY_FLAG}\r\n"
                                f"Connection: close\r\n\r\n".encode())
    assert code == status, body
    if status == 400:
        assert json.loads(body)["error"]["code"] == "invalid_host"


def test_cors_is_only_for_the_allowed_origin(secure):
    body = {"messages": _user(text_part("Hi")), "max_tokens": 2}
    evil = post(secure, body, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in evil.headers
    good = post(secure, body, headers={"Origin": GOOD_ORIGIN})
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == GOOD_ORIGIN
    own = post(secure, body, headers={"Origin": f"http://127.0.0.1:{secure.port}"})   # the server's own page
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(secure.base + "/v1/chat/completions", headers={"Origin": GOOD_ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == GOOD_ORIGIN
    bad = httpx.options(secure.base + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


# ------------------------------------------------------------------------------------------- request fields
# (case, body fields beside a valid conversation, param named by the 400)
UNSUPPORTED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("response_format", {"response_format": {"type": "json_object"}}, "response_format"),
    ("logprobs", {"logprobs": "yes"}, "logprobs"),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("frequency_penalty", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("unknown_model", {"model": "gpt-4o"}, "model"),
    ("unknown_field", {"temprature": 0.5}, "temprature"),
    ("stream_options_not_object", {"stream": True, "stream_options": "yes"}, "stream_options"),
]


@pytest.mark.parametrize("name,fields,param", UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED])
def test_unknown_and_unsupported_fields_are_a_400_naming_them(name, fields, param, secure):
    r = post(secure, {"messages": _user(text_part("Hi")), "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_the_official_client_gets_bad_request_for_tools(secure):
    with pytest.raises(openai.BadRequestError) as e:
        secure.client.chat.completions.create(
            model="tiny", messages=_user(text_part("Hi")), max_tokens=2,
            tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
    assert e.value.param == "tools"


def test_neutral_values_and_null_stream_are_accepted(secure):
    r = post(secure, {"model": "tiny", "messages": _user(text_part("Hi")), "max_tokens": 2, "stream": None,
                      "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "n": None,
                      "response_format": {"type": "text"}, "user": "someone", "temperature": None})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"        # stream: null means false


def _nested(depth):
    return '{"messages": ' + "[" * depth + "]" * depth + "}"


# (case, raw body)
MALFORMED = [
    ("nested_100", _nested(100)),
    ("nested_100000", _nested(100_000)),
    ("nested_objects", '{"messages": [' + '{"a":' * 5000 + "1" + "}" * 5000 + "]}"),
    ("lone_surrogate", '{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'),
    ("lone_low_surrogate_key", '{"messages": [{"role": "user", "content": "hi"}], "\\udc00": 1}'),
    ("raw_surrogate_bytes", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
]


@pytest.mark.parametrize("name,body", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_deep_nesting_and_lone_surrogates_are_a_400(name, body, secure):
    r = post(secure, body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["type"] == "invalid_request_error"
    healthy(secure)


def test_a_valid_surrogate_pair_is_text(secure):
    r = post(secure, '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}',
             headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------------------------- metrics
def _scrape(server):
    r = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {KEY_FLAG}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_latencies(secure):
    before = _scrape(secure)
    reply = secure.client.chat.completions.create(model="tiny", messages=_user(text_part("Count to five.")),
                                                  max_tokens=6)
    chunks = list(secure.client.chat.completions.create(model="tiny", messages=_user(text_part("Say hello.")),
                                                        max_tokens=5, stream=True,
                                                        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    httpx.get(secure.base + "/v1/models")                      # a 401
    httpx.get(secure.base + "/no/such/path/" + "x" * 50, headers={"Authorization": f"Bearer {KEY_FLAG}"})
    after = _scrape(secure)
    grew = lambda name, **labels: _value(after, name, **labels) - _value(before, name, **labels)   # noqa: E731
    assert grew("llava_http_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert grew("llava_http_requests_total", endpoint="/v1/models", status="401") == 1
    assert grew("llava_http_requests_total", endpoint="other", status="404") == 1     # no label per path
    assert grew("llava_prompt_tokens_total") == reply.usage.prompt_tokens + usage.prompt_tokens
    assert grew("llava_completion_tokens_total") == reply.usage.completion_tokens + usage.completion_tokens
    assert grew("llava_time_to_first_token_seconds_count") == 2
    assert grew("llava_e2e_request_latency_seconds_count") == 2
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert grew("llava_inter_token_latency_seconds_count") >= pieces - 1
    assert grew("llava_requests_completed_total") == 2 and grew("llava_scheduler_steps_total") >= 5
    assert _value(after, "llava_queue_depth") == 0 and _value(after, "llava_running_rows") == 0
    health = httpx.get(secure.base + "/health").json()
    assert _value(after, "llava_kv_blocks") == health["kv_blocks"] > 0
    assert _value(after, "llava_prefix_cache_hits_total") == health["prefix_hits"]
    assert _value(after, "llava_image_cache_misses_total") == health["image_cache_misses"]


# ------------------------------------------------------------------------------------- afterwards, and flags
def test_the_server_is_healthy_and_its_memory_bounded_after_all_this(secure):
    """Runs last in the module: the hostile bodies above did not leave the server sick or swollen."""
    start = rss_kb(secure)
    for _ in range(3):
        post(secure, _nested(100_000), headers={"Content-Type": "application/json"})
    assert rss_kb(secure) - start < 200_000
    reply = secure.client.chat.completions.create(model="tiny", messages=_user(text_part("Still there?")),
                                                  max_tokens=2)
    assert reply.choices[0].message.content is not None
    healthy(secure)


# (case, extra flags, words of the one-line error)
BAD_FLAGS = [("missing_key_file", ["--api_key_file", "/nonexistent/keys"], "no such file"),
             ("bad_origin", ["--allowed_origins", "app.example"], "not an origin"),
             ("negative_redirects", ["--media_redirects", "-1"], "--media_redirects")]


@pytest.mark.parametrize("name,flags,words", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_serve_flags_are_one_line_before_loading(name, flags, words, setup):
    start = time.monotonic()
    p = run_cli([RUN, "--config", setup["yaml"], "--run_mode", "serve", "--load_checkpoint", setup["ckpt"],
                 "--port", str(free_port()), *flags], timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("run_mindformer.py: error: ") and words in last, p.stderr[-1500:]
    assert "Traceback" not in p.stderr and time.monotonic() - start < 60


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(secure):
    text = "word " * 200_000                  # 1 MB: far more than 512 tokens can hold
    start = time.monotonic()
    r = post(secure, {"messages": _user(text_part(text)), "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text[:300]
    assert "characters" in r.json()["error"]["message"] and time.monotonic() - start < 5
    healthy(secure)


def _health(server):
    return httpx.get(server.base + "/health", timeout=10).json()


def test_a_non_streaming_client_that_leaves_frees_its_row(secure):
    before = _health(secure)
    body = json.dumps({"messages": _user(text_part("Tell me everything.")), "max_tokens": 480}).encode()
    with socket.create_connection(("127.0.0.1", secure.port), timeout=30) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_FLAG}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while _health(secure)["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _health(secure)["running"] == 1
    left = time.monotonic()
    while _health(secure)["running"] and time.monotonic() - left < 10:
        time.sleep(0.02)
    after = _health(secure)
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]         # it was stopped, not run to its end


# ------------------------------------------------------------------------------------------ the page and the key
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Chromium is missing (scripts/test.sh installs it)")
def test_the_page_asks_for_the_key_once_and_keeps_it_for_the_tab(secure):
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            context = browser.new_context()
            page = context.new_page()
            asked = []
            page.on("dialog", lambda d: (asked.append(d.message), d.accept(KEY_FILE_1)))
            page.goto(secure.base + "/")
            expect(page.locator("#model")).to_have_text("tiny")      # /limits and /v1/models with the key
            assert len(asked) == 1 and "API key" in asked[0]
            page.fill("#prompt", "Hello")
            page.click("#send")
            answer = page.locator(".msg.assistant").last
            expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
            page.reload()                                            # the same tab keeps it
            expect(page.locator("#model")).to_have_text("tiny")
            assert len(asked) == 1
            assert page.evaluate("sessionStorage.getItem('llava-api-key')") == KEY_FILE_1
            assert page.evaluate("localStorage.length") == 0         # never kept on disk
            other = context.new_page()                               # another tab asks again
            other.on("dialog", lambda d: (asked.append(d.message), d.accept("sk-wrong")))
            other.goto(secure.base + "/")
            expect(other.locator("#notice")).to_be_visible()
            assert len(asked) == 2
        finally:
            browser.close()


def test_text_requests_do_not_wait_for_trickling_image_downloads(server, images):
    """More slow image URLs than uvicorn's thread pool has threads (40): they queue in the image pool, and a
    text-only request (the conftest server, which may fetch from 127.0.0.1) is answered as fast as alone."""
    import threading
    ask = lambda: server.client.chat.completions.create(model="tiny", messages=_user(text_part("Hi")),  # noqa
                                                        max_tokens=2)
    ask()
    alone = _timed(ask)
    body = {"messages": _user(image_part(images.url("/trickle.jpg")), text_part("?")), "max_tokens": 2}
    slow = [threading.Thread(target=lambda: httpx.post(server.base + "/v1/chat/completions", json=body,
                                                       timeout=300), daemon=True) for _ in range(48)]
    for t in slow:
        t.start()
    time.sleep(2.0)                 # every one of them is in (a download lasts processor.timeout, 10 s)
    assert images.seen.count("/trickle.jpg") >= 4
    busy = _timed(ask)
    health = _timed(lambda: httpx.get(server.base + "/health", timeout=10))
    assert busy < alone + 1.0 and health < 1.0, (alone, busy, health)


def _timed(fn):
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def _stream_events(server, max_tokens, out):
    """Read one streamed answer's SSE lines into `out` (a list) until the connection ends."""
    body = {"messages": _user(text_part("Tell me everything.")), "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY_FLAG}"}) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])


def test_sigterm_drains_then_ends_open_streams_with_an_error_and_done(secure):
    """Runs last (it stops the module's server): a short answer running at the signal finishes, new requests
    get 503, the long one still open after --shutdown_grace_s ends with an error event and [DONE], exit 0."""
    import signal
    import threading
    long_events, short_events = [], []
    long = threading.Thread(target=_stream_events, args=(secure, 480, long_events))
    long.start()
    deadline = time.monotonic() + 30
    while len(long_events) < 4 and time.monotonic() < deadline:      # it streams
        time.sleep(0.01)
    short = threading.Thread(target=_stream_events, args=(secure, 3, short_events))
    short.start()
    while not short_events and time.monotonic() < deadline:         # admitted (its answer has begun)
        time.sleep(0.005)
    secure.proc.send_signal(signal.SIGTERM)
    statuses = set()
    while time.monotonic() < deadline and 503 not in statuses:
        try:
            statuses.add(httpx.get(secure.base + "/v1/models", timeout=5,
                                   headers={"Authorization": f"Bearer {KEY_FLAG}"}).status_code)
        except httpx.HTTPError:
            break
    long.join(timeout=30)
    short.join(timeout=30)
    assert secure.proc.wait(timeout=30) == 0, secure.stderr()
    assert 503 in statuses
    assert short_events[0] == 200 and short_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert long_events[0] == 200 and long_events[-1] == "[DONE]", long_events[-3:]
    error = json.loads(long_events[-2])["error"]
    assert error["code"] == "shutting_down", error
    assert "Traceback" not in secure.stderr()
