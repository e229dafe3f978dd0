"""Drives the gateway with the official `ollama` Python client, as a user would.

Usage: ollama_client.py BASE_URL API_KEY MODEL
"""
import sys

import ollama

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = ollama.Client(host=base, headers={"Authorization": f"Bearer {key}"}, timeout=20)

names = [m.model for m in client.list().models]
assert model in names, names

r = client.chat(model=model, messages=[{"role": "user", "content": "why is the sky blue"}])
assert r.message.content.startswith("tok0"), r
assert r.prompt_eval_count == 5 and r.eval_count == 5, r

parts = [c.message.content for c in client.chat(model=model, messages=[{"role": "user", "content": "hi"}], stream=True)]
assert "".join(parts).startswith("tok0 tok1"), parts

g = client.generate(model=model, prompt="hello there")
assert g.response.startswith("tok0"), g

e = client.embed(model=model, input=["a", "b"])
assert len(e.embeddings) == 2, e

bad = ollama.Client(host=base, headers={"Authorization": "Bearer nope"}, timeout=20)
try:
    bad.chat(model=model, messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("a wrong key must be refused")
except ollama.ResponseError as err:
    assert err.status_code == 401, err
    # Ollama's error shape: `error` is the message, a string.
    assert isinstance(err.error, str) and "credentials" in err.error, err.error

s = client.show(model)
assert s.modelinfo["general.architecture"] == "llama", s
assert s.details.family == "llama", s

running = [m.model for m in client.ps().models]
assert running == [model], running

print("ollama client: ok")
