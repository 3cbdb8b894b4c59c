"""Load for the lab's tunnel (tests/load.rs), bounded in count and time.

  load.py server HOST              TCP echo on HOST:9000, UDP echo on HOST:9001
  load.py hold HOST N EXTRA        N TCP connections held open and echoed through,
                                   then EXTRA more while they are held; JSON out
  load.py udp HOST RATE SECONDS    datagrams at RATE per second, echoes counted; JSON out

Each step prints one JSON line. Addresses are the lab's namespaces only.
"""
import asyncio
import json
import resource
import socket
import sys
import time


def more_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host):
    async def echo(reader, writer):
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(data, addr)

    server = await asyncio.start_server(echo, host, 9000, backlog=4096)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Udp, local_addr=(host, 9001))
    async with server:
        await server.serve_forever()


async def connect_and_echo(host, i, timeout):
    """A connection that has echoed once: (reader, writer), or the error's name."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, 9000), timeout)
        msg = b"hello %08d\n" % i
        writer.write(msg)
        got = await asyncio.wait_for(reader.readexactly(len(msg)), timeout)
        return (reader, writer) if got == msg else "garbled"
    except asyncio.TimeoutError:
        return "timeout"
    except (ConnectionRefusedError, ConnectionResetError):
        return "reset"
    except OSError as e:
        return type(e).__name__


async def hold(host, n, extra):
    started = time.time()
    # 50 at a time, as a browser or a test suite would open them.
    conns = []
    for base in range(0, n, 50):
        conns += await asyncio.gather(*(connect_and_echo(host, i, 20) for i in range(base, min(n, base + 50))))
    held = [c for c in conns if isinstance(c, tuple)]
    opened_in = time.time() - started
    await asyncio.sleep(2)
    # Every held connection still carries: echo once more on each.
    async def again(c, i):
        reader, writer = c
        msg = b"again %08d\n" % i
        writer.write(msg)
        try:
            return await asyncio.wait_for(reader.readexactly(len(msg)), 20) == msg
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            return False
    alive = sum(await asyncio.gather(*(again(c, i) for i, c in enumerate(held))))
    # Beyond them: the agent's per-client flow limit answers, never hangs.
    beyond = await asyncio.gather(*(connect_and_echo(host, n + i, 20) for i in range(extra)))
    errors = {}
    for c in conns + beyond:
        if not isinstance(c, tuple):
            errors[c] = errors.get(c, 0) + 1
    for c in held + [c for c in beyond if isinstance(c, tuple)]:
        c[1].close()
    print(json.dumps({
        "held": len(held), "alive_after_2s": alive, "opened_in_s": round(opened_in, 2),
        "extra_ok": sum(isinstance(c, tuple) for c in beyond), "errors": errors,
    }), flush=True)


async def udp(host, rate, seconds):
    loop = asyncio.get_running_loop()
    received = set()

    class Counter(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            received.add(int(data[:8]))

    transport, _ = await loop.create_datagram_endpoint(Counter, remote_addr=(host, 9001))
    total = rate * seconds
    start = time.time()
    for i in range(total):
        transport.sendto(b"%08d" % i + b"x" * 92)
        # Paced in bursts of 50: on schedule, never ahead of it.
        if i % 50 == 49:
            ahead = start + (i + 1) / rate - time.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
    sent_in = time.time() - start
    await asyncio.sleep(2)
    transport.close()
    print(json.dumps({
        "sent": total, "echoed": len(received), "lost_pct": round(100 * (total - len(received)) / total, 3),
        "sent_in_s": round(sent_in, 2), "rate": round(total / sent_in),
    }), flush=True)


def main():
    more_files()
    mode, host = sys.argv[1], sys.argv[2]
    if mode == "server":
        asyncio.run(serve(host))
    elif mode == "hold":
        asyncio.run(hold(host, int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "udp":
        asyncio.run(udp(host, int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
