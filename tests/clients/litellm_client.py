"""Drives the gateway with the LiteLLM SDK, through both of its Ollama providers and its
OpenAI one, as a user would.

Usage: litellm_client.py BASE_URL API_KEY MODEL
"""
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network look-ups
import litellm  # noqa: E402

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
litellm.telemetry = False
messages = [{"role": "user", "content": "why is the sky blue"}]
auth = {"Authorization": f"Bearer {key}"}

# ollama/… posts to /api/generate, ollama_chat/… to /api/chat: both without a JSON
# content type, which the gateway must accept from a header-authenticated client.
for provider in ("ollama", "ollama_chat"):
    r = litellm.completion(
        model=f"{provider}/{model}", api_base=base, messages=messages, headers=auth, timeout=20
    )
    assert r.choices[0].message.content.startswith("tok0"), (provider, r)
    assert r.usage.completion_tokens == 5, (provider, r.usage)
    parts = [
        c.choices[0].delta.content or ""
        for c in litellm.completion(
            model=f"{provider}/{model}",
            api_base=base,
            messages=messages,
            headers=auth,
            stream=True,
            timeout=20,
        )
    ]
    assert "".join(parts).startswith("tok0 tok1"), (provider, parts)

# openai/… against the gateway's OpenAI routes.
r = litellm.completion(
    model=f"openai/{model}", api_base=f"{base}/v1", api_key=key, messages=messages, timeout=20
)
assert r.choices[0].message.content.startswith("tok0"), r
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5, r.usage

# A wrong key is refused, and LiteLLM raises its authentication error.
try:
    litellm.completion(
        model=f"ollama_chat/{model}",
        api_base=base,
        messages=messages,
        headers={"Authorization": "Bearer nope"},
        timeout=20,
    )
    raise AssertionError("a wrong key must be refused")
except litellm.exceptions.APIConnectionError as err:
    assert "401" in str(err) or "invalid" in str(err).lower(), err
except litellm.exceptions.AuthenticationError:
    pass

print("litellm client: ok")
