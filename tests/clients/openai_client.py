"""Drives the gateway with the official `openai` Python client, as a user would.

Usage: openai_client.py BASE_URL API_KEY MODEL
Exits non-zero (with the failing assertion) when the gateway misbehaves.
"""
import sys

import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20)

models = [m.id for m in client.models.list()]
assert model in models, models

resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "why is the sky blue"}])
assert resp.choices[0].message.content.startswith("tok0"), resp
assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == 5, resp.usage

chunks, usage = [], None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        chunks.append(chunk.choices[0].delta.content or "")
    if chunk.usage:
        usage = chunk.usage
assert "".join(chunks).startswith("tok0 tok1"), chunks
assert usage is not None and usage.completion_tokens == 5, usage

# Without include_usage the client gets no usage event (the gateway still counts tokens).
plain = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True))
assert all(c.usage is None for c in plain), plain
assert all(c.choices for c in plain), "no usage-only chunk reaches a client that did not ask"
assert "".join(c.choices[0].delta.content or "" for c in plain).startswith("tok0"), plain

emb = client.embeddings.create(model=model, input="hello world")
assert len(emb.data[0].embedding) == 4, emb

bad = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-gw-wrong", max_retries=0, timeout=20)
try:
    bad.models.list()
    raise AssertionError("a wrong key must be refused")
except openai.AuthenticationError as e:
    assert e.status_code == 401
    assert e.code == "invalid_api_key", e.body

try:
    client.chat.completions.create(model=model, messages="not a list", extra_body={"model": 3})
    raise AssertionError("a bad body must be refused")
except openai.BadRequestError as e:
    assert e.status_code == 400, e

print("openai client: ok")
