"""An ASGI app (serve's, the review page's) on a free 127.0.0.1 port in a thread, for tests
that talk to it over real HTTP."""

import contextlib
import threading
import time


@contextlib.contextmanager
def app_on_a_port(app, timeout_s: float = 30.0, **config):
    """Yields the base URL while uvicorn serves ``app``; stops it after."""
    import uvicorn

    from cai_ray.runtime import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
