"""Opens N keep-alive connections to HOST:PORT, sends one `GET /health` on each, keeps them
open and idle, then closes them; prints the server's RSS (from /proc/PID/status) at each step.

Usage: idle_conns.py PORT PID N [--hold SECONDS] [--slowloris | --silent | --streams]
  --slowloris: send only the first bytes of a request head on each connection instead;
  --silent: send nothing at all;
  --streams: run N streamed generations at once (POST /api/generate to a mock-ollama with a
  chunk delay behind the server) and report RSS while they run and after.
"""
import asyncio
import sys
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def open_one(port, slowloris, silent=False):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if silent:
        return r, w
    if slowloris:
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await w.drain()
        return r, w
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    await r.readexactly(n)
    return r, w


STREAM_BODY = b'{"model":"llama3.1:8b","prompt":"x"}'


async def one_stream(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(STREAM_BODY)
            + STREAM_BODY)
    await w.drain()
    while await r.read(65536):
        pass
    w.close()


async def streams(port, pid, n):
    idle = rss_mb(pid)
    tasks = [asyncio.create_task(one_stream(port)) for _ in range(n)]
    await asyncio.sleep(1.0)
    running = rss_mb(pid)
    await asyncio.gather(*tasks)
    await asyncio.sleep(3)
    after = rss_mb(pid)
    print(f"{n} concurrent streams: RSS idle {idle:.1f} MiB, while running {running:.1f} MiB "
          f"(+{running - idle:.1f}), 3 s after they ended {after:.1f} MiB (+{after - idle:.1f})")


async def main():
    if "--streams" in sys.argv:
        await streams(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
        return
    port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    hold = float(sys.argv[sys.argv.index("--hold") + 1]) if "--hold" in sys.argv else 2.0
    slowloris = "--slowloris" in sys.argv
    silent = "--silent" in sys.argv
    idle = rss_mb(pid)
    conns = []
    batch = 200
    for i in range(0, n, batch):
        conns += await asyncio.gather(*(open_one(port, slowloris, silent) for _ in range(min(batch, n - i))))
    await asyncio.sleep(hold)
    held = rss_mb(pid)
    for _, w in conns:
        w.close()
    await asyncio.sleep(3)
    after = rss_mb(pid)
    kind = "slowloris" if slowloris else "silent" if silent else "idle keep-alive"
    print(f"{n} {kind} connections: RSS idle {idle:.1f} MiB, held {held:.1f} MiB "
          f"(+{held - idle:.1f}, {(held - idle) * 1024 / n:.1f} KiB each), "
          f"3 s after closing {after:.1f} MiB (+{after - idle:.1f})")


asyncio.run(main())
