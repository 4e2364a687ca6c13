"""What the server reports about itself: ``/health`` (is the engine stepping, are its steps failing) and
``/metrics`` (Prometheus text of the engine's counters and gauges and the server's request counts)."""

import weakref
from typing import Any, Protocol

from .server_input import scrub


class ServerState(Protocol):
    """What these reports read of an :class:`~.server.OpenAIServer` (typed here without importing the server)."""

    engine: Any
    roots: tuple[str, ...]
    nfe_total: int
    nfe_count: int
    received: int
    failed: int

# For an AsyncEngine without `healthy`: its last step error and the count of successful steps when it was seen.
_ERRORS_SEEN: "weakref.WeakKeyDictionary[Any, tuple[BaseException, int]]" = weakref.WeakKeyDictionary()


def note_failure(server: "ServerState") -> tuple[BaseException, int] | None:
    """Remember when the engine's last step error was first seen (by the number of successful steps), for
    ``/health`` of an AsyncEngine that does not report ``healthy`` itself."""
    error = getattr(server.engine, "error", None)
    seen = _ERRORS_SEEN.get(server.engine)
    if error is not None and (seen is None or seen[0] is not error):
        seen = _ERRORS_SEEN[server.engine] = (error, getattr(server.engine.engine, "num_steps", 0))
    return seen


def health_status(server: "ServerState") -> tuple[int, dict[str, str]]:
    """``/health``: 200 ``ok``; 503 ``degraded`` while engine steps fail (it recovers with the next step that
    succeeds) and 503 ``error`` when the stepping thread is not running."""
    engine = server.engine
    if not engine.is_running:
        return 503, {"status": "error", "message": "the engine thread is not running."}
    broken = getattr(engine.engine, "broken", None)
    if isinstance(broken, str):  # a tensor-parallel rank failed: no step can run again
        return 503, {"status": "error", "message": scrub(broken, server.roots)}
    healthy = getattr(engine, "healthy", None)
    if not isinstance(healthy, bool):  # an AsyncEngine without it: failing until a step succeeds
        error, seen = engine.error, note_failure(server)
        healthy = error is None or getattr(engine.engine, "num_steps", 0) > seen[1]
    if healthy:
        return 200, {"status": "ok"}
    error = engine.error
    why = f": {type(error).__name__}: {error}" if error is not None else "."
    return 503, {"status": "degraded", "message": scrub(f"engine steps are failing{why}", server.roots)}


def metrics_text(server: "ServerState") -> str:
    """The Prometheus exposition of the engine's counters and gauges."""
    s = server.engine.stats()
    nfe = server.nfe_total / server.nfe_count if server.nfe_count else 0.0
    failed = s.get("failed", server.failed)  # the engine's counts once it keeps them
    received = s.get("received", server.received)
    rows = [
        ("diffuse_requests_waiting", "gauge", "Requests queued for a slot.", s["waiting"]),
        ("diffuse_requests_running", "gauge", "Requests being decoded.", s["running"]),
        ("diffuse_requests_received_total", "counter",
         "Requests handed to the engine (finished + aborted + failed once none is in flight).", received),
        ("diffuse_requests_finished_total", "counter", "Requests finished.", s["finished"]),
        ("diffuse_requests_aborted_total", "counter", "Requests aborted (cancelled or disconnected).", s["aborted"]),
        ("diffuse_requests_failed_total", "counter", "Requests that ended with an error.", failed),
        ("diffuse_output_tokens_total", "counter", "Canvas tokens of finished requests.", s["tokens_out"]),
        ("diffuse_output_tokens_per_second", "gauge", "Output tokens per second since start.", s["tokens_per_s"]),
        ("diffuse_steps_total", "counter", "Engine steps (one forward each).", s["steps"]),
        ("diffuse_step_seconds_total", "counter", "Seconds spent in engine steps.", s["step_seconds_total"]),
        ("diffuse_step_seconds_last", "gauge", "Duration of the last engine step.", s["last_step_seconds"]),
        ("diffuse_nfe_per_request", "gauge", "Mean forward evaluations per finished request.", nfe),
        ("diffuse_kv_pages_free", "gauge", "Free KV-cache pages.", s["kv_free_pages"]),
        ("diffuse_kv_pages_total", "gauge", "KV-cache pages (0 until a request uses the cache).", s["kv_total_pages"]),
    ]
    lines = []
    for name, kind, text, value in rows:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    estimate = getattr(server.engine.engine, "last_estimate", None)  # the cost model's view of the last step
    regime = s.get("regime", getattr(estimate, "regime", None))  # only when the engine reports one
    if regime in ("memory", "compute"):
        lines += ["# HELP diffuse_step_regime Whether the last step was memory- or compute-bound.",
                  "# TYPE diffuse_step_regime gauge"]
        lines += [f'diffuse_step_regime{{regime="{r}"}} {int(r == regime)}' for r in ("memory", "compute")]
    return "\n".join(lines) + "\n"
