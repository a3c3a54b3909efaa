"""Drives `flexllm serve` with the official openai package (unchanged) and raw HTTP.

usage: openai_client.py BASE_URL MODEL EXPECTED_FILE KEYED_URL API_KEY
  BASE_URL      a server without an API key, e.g. http://127.0.0.1:PORT
  MODEL         its base model's name
  EXPECTED_FILE the text `flexllm generate` wrote for PROMPT (greedy, ignore-eos, 12 tokens)
  KEYED_URL     a second server started with --api-key API_KEY and a small --max-body-bytes
Prints one line per check: "PASS description", "FAIL description: why" or "SKIP ...".
"""
import json
import socket
import sys
import time
import urllib.error
import urllib.request

import openai

PROMPT = "Once upon a time"
BASE, MODEL, EXPECTED_FILE, KEYED, KEY = sys.argv[1:6]
with open(EXPECTED_FILE, encoding="utf-8") as f:
    EXPECTED = f.read()
if EXPECTED.endswith("\n"):
    EXPECTED = EXPECTED[:-1]

client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=60)
failures = 0


def check(desc, cond, why=""):
    global failures
    if cond:
        print("PASS " + desc, flush=True)
    else:
        failures += 1
        print("FAIL %s: %s" % (desc, why), flush=True)


def raw(method, path, body=None, headers=None, base=BASE):
    """(status, headers, parsed JSON or text) of one request; bodies are bytes or dicts."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, hdrs, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, e.headers, e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def error_of(status, resp, want_status, want_in_message, param=None):
    """Why an answer is not the expected OpenAI error ("" when it is)."""
    if status != want_status:
        return "status %d, want %d: %s" % (status, want_status, resp)
    err = resp.get("error") if isinstance(resp, dict) else None
    if not isinstance(err, dict) or err.get("type") is None or "message" not in err:
        return "not an OpenAI error object: %s" % resp
    if want_in_message not in err["message"]:
        return "message %r lacks %r" % (err["message"], want_in_message)
    if param is not None and err.get("param") != param:
        return "param %r, want %r" % (err.get("param"), param)
    return ""


def expect_error(desc, status, resp, want_status, want_in_message, param=None):
    why = error_of(status, resp, want_status, want_in_message, param)
    check(desc, not why, why)


def status_of(base=BASE, headers=None):
    return raw("GET", "/admin/status", headers=headers, base=base)[2]


# ------------------------------------------------------------------ inference
models = client.models.list()
ids = [m.id for m in models.data]
check("models.list names the base model", MODEL in ids, ids)

c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True})
check("completions: greedy text equals `flexllm generate`", c.choices[0].text == EXPECTED,
      "%r vs %r" % (c.choices[0].text, EXPECTED))
check("completions: usage counts 12 completion tokens and the prompt",
      c.usage.completion_tokens == 12 and c.usage.prompt_tokens > 0
      and c.usage.total_tokens == c.usage.prompt_tokens + 12, c.usage)
check("completions: finish_reason length", c.choices[0].finish_reason == "length", c.choices[0].finish_reason)

chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}))
text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
check("completions streamed: the chunks add up to the same text", text == EXPECTED, "%r" % text)
check("completions streamed: several chunks, the last choice with finish_reason",
      len(chunks) > 3 and [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == "length",
      len(chunks))
check("completions streamed: include_usage ends with a usage chunk without choices",
      chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12, chunks[-1])

msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
check("chat: an assistant message of 10 tokens",
      chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 10, chat)
stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
parts = list(stream)
check("chat streamed: the first delta has the role, the deltas add up to the same content",
      parts[0].choices[0].delta.role == "assistant"
      and "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content,
      parts[:2])
check("chat streamed: object chat.completion.chunk, last finish_reason length",
      all(p.object == "chat.completion.chunk" for p in parts)
      and parts[-1].choices[0].finish_reason == "length", parts[-1])

# The first chunk arrives while the request still runs: the server says so between chunks.
long = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=900, stream=True,
                                 extra_body={"ignore_eos": True})
it = iter(long)
first = next(it)
running_then = status_of()["requests"]["running"]
rest = sum(1 for _ in it)
check("streaming: the first chunk comes while the request is still running (%d running then, %d chunks after)"
      % (running_then, rest), running_then >= 1 and rest > 10, running_then)

# ------------------------------------------------------------ malformed input
s, _, r = raw("POST", "/v1/completions", b'{"model": "x", "prompt": ', {"Content-Type": "application/json"})
expect_error("bad JSON: 400 with the parser's message", s, r, 400, "not valid JSON")
s, _, r = raw("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"})
expect_error("max_tokens as a string: 400 naming the field", s, r, 400, "'max_tokens' must be an integer", "max_tokens")
s, _, r = raw("POST", "/v1/chat/completions", {"model": MODEL, "messages": "hello"})
expect_error("messages not a list: 400 naming the field", s, r, 400, "'messages' must be an array", "messages")
s, _, r = raw("POST", "/v1/completions", {"model": "no-such-model", "prompt": "a"})
expect_error("unknown model: 404 naming it and the known ones", s, r, 404, "'no-such-model' does not exist; known models: " + MODEL)
s, _, r = raw("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -5})
expect_error("negative max_tokens: 400", s, r, 400, "'max_tokens' must be at least 1", "max_tokens")
s, _, r = raw("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10 ** 7})
expect_error("max_tokens beyond the context: 400", s, r, 400, "maximum context length", "max_tokens")
s, _, r = raw("POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "n": 2})
expect_error("n=2: 400", s, r, 400, "'n' must be 1", "n")
s, _, r = raw("GET", "/v1/no/such/route")
expect_error("unknown route: 404", s, r, 404, "no route for GET /v1/no/such/route")
s, h, r = raw("DELETE", "/v1/chat/completions")
expect_error("wrong method: 405", s, r, 405, "use POST")
check("wrong method: an Allow header", h.get("Allow") == "POST", dict(h))

# A client that goes away mid-stream: its request is cancelled, the next one is served.
host, port = BASE.split("//")[1].split(":")
sock = socket.create_connection((host, int(port)), timeout=30)
body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "stream": True,
                   "ignore_eos": True}).encode()
sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
got = b""
while b"data: " not in got:
    got += sock.recv(4096)
sock.close()
cancelled = 0
for _ in range(100):
    st = status_of()
    cancelled = st["requests"]["finished"].get("cancelled", 0)
    if cancelled >= 1 and st["requests"]["running"] == 0 and st["requests"]["waiting"] == 0:
        break
    time.sleep(0.05)
check("a client disconnecting mid-stream cancels its request", cancelled >= 1, st["requests"])
after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
check("the next request after the disconnect is served in full", after.choices[0].text == EXPECTED,
      after.choices[0].text)

# ----------------------------------------------------------- files and jobs
lines = [json.dumps({"prompt": "Q: what is %d plus %d?\nA:" % (i, i), "completion": " %d" % (2 * i)})
         for i in range(6)]
lines += [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello there"}]})]
good = ("\n".join(lines) + "\n").encode()
f = client.files.create(file=("train.jsonl", good), purpose="fine-tune")
check("files.create stores the upload", f.id.startswith("file-") and f.bytes == len(good)
      and f.purpose == "fine-tune", f)
check("files.retrieve and files.list return it",
      client.files.retrieve(f.id).filename == "train.jsonl" and f.id in [x.id for x in client.files.list()])
try:
    client.files.create(file=("bad.jsonl", b'{"text": "fine"}\n{"prompt": 3, "completion": "x"}\n'),
                        purpose="fine-tune")
    check("a training file with a bad line is refused", False, "accepted")
except openai.BadRequestError as e:
    check("a training file with a bad line: 400 naming line 2 and the field",
          "line 2" in str(e) and "'prompt' must be a string" in str(e), str(e))

job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="adder", seed=7,
                                     hyperparameters={"n_epochs": 2, "batch_size": 1,
                                                      "learning_rate_multiplier": 5})
check("fine_tuning.jobs.create answers validating_files", job.status == "validating_files", job.status)
deadline = time.time() + 60
seen = {job.status}
while time.time() < deadline:
    job = client.fine_tuning.jobs.retrieve(job.id)
    seen.add(job.status)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(0.1)
check("the job succeeds with a fine-tuned model name and trained tokens (went through %s)" % sorted(seen),
      job.status == "succeeded" and job.fine_tuned_model == "ft:%s:adder:%s" % (MODEL, job.id[len("ftjob-"):])
      and job.trained_tokens > 0, job)
events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
check("list_events: newest first, loss events, the success last",
      events[0].message == "The job has successfully completed"
      and any("training loss=" in e.message for e in events)
      and all(events[i].created_at >= events[i + 1].created_at for i in range(len(events) - 1)),
      [e.message for e in events])
check("jobs.list holds the job", job.id in [j.id for j in client.fine_tuning.jobs.list().data])
ft = job.fine_tuned_model
check("models.list shows the adapter with its parent",
      any(m.id == ft and getattr(m, "parent", None) == MODEL for m in client.models.list().data))
tuned = client.chat.completions.create(model=ft, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0)
check("chat with the finished adapter's name", tuned.model == ft and tuned.choices[0].message.content is not None,
      tuned)
raw_ft = client.completions.create(model=ft, prompt="Q: what is 3 plus 3?\nA:", max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
raw_base = client.completions.create(model=MODEL, prompt="Q: what is 3 plus 3?\nA:", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
check("the adapter changes what the model says (%r vs base %r)" % (raw_ft, raw_base), raw_ft != raw_base)

long_job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, hyperparameters={"n_epochs": 500})
for _ in range(200):
    if client.fine_tuning.jobs.retrieve(long_job.id).status == "running":
        break
    time.sleep(0.05)
cancelled_job = client.fine_tuning.jobs.cancel(long_job.id)
later = client.fine_tuning.jobs.retrieve(long_job.id)
check("fine_tuning.jobs.cancel stops a running job", cancelled_job.status == "cancelled"
      and later.status == "cancelled" and later.fine_tuned_model is None, later)
check("the server still answers while and after jobs run",
      client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text == EXPECTED)
s, _, r = raw("POST", "/v1/fine_tuning/jobs", {"model": MODEL, "training_file": "file-nope"})
expect_error("a job on an unknown file: 400", s, r, 400, "no such file 'file-nope'", "training_file")

# ------------------------------------------------------------- vLLM adapters
adir = [a["dir"] for a in status_of()["adapters"]["known"] if a["name"] == ft][0]
s, _, r = raw("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": adir})
check("load_lora_adapter: 200", s == 200 and "added" in r, (s, r))
again = client.completions.create(model="mine", prompt="Q: what is 3 plus 3?\nA:", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
check("the loaded adapter generates as the job's adapter does", again == raw_ft, (again, raw_ft))
s, _, r = raw("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": adir})
expect_error("loading the same name twice: 400", s, r, 400, "already been loaded")
s, _, r = raw("POST", "/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": "/no/such/dir"})
expect_error("load_lora_adapter from a missing folder: 400", s, r, 400, "ghost")
s, _, r = raw("POST", "/v1/unload_lora_adapter", {"lora_name": "mine"})
check("unload_lora_adapter: 200", s == 200 and "removed" in r, (s, r))
s, _, r = raw("POST", "/v1/unload_lora_adapter", {"lora_name": "mine"})
expect_error("unloading an unknown adapter: 404", s, r, 404, "cannot be found")

# ------------------------------------------------------------------ metrics
s, h, m = raw("GET", "/metrics")
count = [l for l in m.splitlines() if l.startswith("flexllm_time_to_first_token_seconds_count")]
check("/metrics: TTFT histogram counts the finished requests",
      s == 200 and count and int(float(count[0].split()[-1])) >= 8, count)
check("/metrics: SLO attainment per rule and finetuning loss per job",
      'flexllm_slo_attainment{rule="default"}' in m and ('flexllm_finetune_loss{job="%s"}' % job.id) in m)
s, _, r = raw("GET", "/health")
check("/health: 200 ok", s == 200 and r == "ok", (s, r))

# ------------------------------------------------------- the keyed server
s, h, r = raw("GET", "/v1/models", base=KEYED)
expect_error("no API key: 401", s, r, 401, "didn't provide an API key")
s, h, r = raw("GET", "/v1/models", headers={"Authorization": "Bearer wrong"}, base=KEYED)
expect_error("a wrong API key: 401", s, r, 401, "Incorrect API key")
s, h, r = raw("GET", "/admin/status", base=KEYED)
expect_error("admin routes need the key too", s, r, 401, "API key")
keyed = openai.OpenAI(base_url=KEYED + "/v1", api_key=KEY, max_retries=0)
check("the right key works through the openai client", MODEL in [x.id for x in keyed.models.list().data])
s, _, r = raw("GET", "/health", base=KEYED)
check("/health needs no key", s == 200, s)
big = {"model": MODEL, "prompt": "x" * 200000}
s, _, r = raw("POST", "/v1/completions", big, headers={"Authorization": "Bearer " + KEY}, base=KEYED)
check("a body over --max-body-bytes: 413", s == 413, (s, str(r)[:200]))
keyed_text = keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
check("the keyed server serves after the oversized body", keyed_text == EXPECTED, keyed_text)
sys.exit(1 if failures else 0)
