#!/usr/bin/env bash
# Installs what building and testing llm-gateway need on a fresh Debian/Ubuntu machine that
# has only a Rust toolchain. Idempotent: anything already there is left alone.
#   tests/bootstrap.sh          what building needs (cmake: Pingora builds zlib-ng)
#   tests/bootstrap.sh --test   also what the tests need: curl, promtool, redis-server (the
#                               shared-state tests start their own), systemd-analyze
#                               (the unit's checks; nothing is started), a C/C++ compiler,
#                               and a Python virtual environment under target/pyenv with the
#                               openai, ollama and LiteLLM clients and llama-cpp-python
#                               (compiled from source: a few minutes, once)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# cmake's generator needs make; llama-cpp-python needs g++.
{ command -v make && command -v g++; } >/dev/null 2>&1 || need+=(build-essential)
if [ "${1:-}" = "--test" ]; then
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "bootstrap: missing ${need[*]}; install them as root: apt-get install ${need[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  echo "bootstrap: installing ${need[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
  # Debian's prometheus package starts a Prometheus server (port 9090, all interfaces): only
  # promtool is wanted here.
  if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    "${sudo[@]}" systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
  # Likewise its redis-server package starts a Redis (port 6379): the tests start their own.
  if [[ " ${need[*]} " == *" redis-server "* ]] && [ -d /run/systemd/system ]; then
    "${sudo[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
fi
[ "${1:-}" = "--test" ] || exit 0

venv=target/pyenv
if ! "$venv/bin/python3" -c 'import openai, ollama, litellm, llama_cpp, gguf, uvicorn' 2>/dev/null; then
  echo "bootstrap: Python clients into $venv (llama-cpp-python compiles llama.cpp: a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install -q --upgrade pip
  "$venv/bin/python3" -m pip install -q -r tests/clients/requirements.txt -r tests/clients/requirements-llama.txt
fi
