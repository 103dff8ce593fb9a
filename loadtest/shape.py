"""A stepped load shape for the scaling curves: hold each user count for a fixed time, in turn.

Used as the second locustfile of a scaling run (``locust -f locustfile.py,shape.py``). Each step
first waits until the runner really has the step's user count, and only then starts the dwell
timer, so every plateau is measured at full concurrency for its whole length (spawning 64 users
on a busy 2-core machine can take seconds). The figures are computed later from the per-request
log; this shape writes the plateau boundaries to ``steps.jsonl`` in LOADTEST_LOG_DIR:

    {"step": 0, "users": 4, "phase": "reached", "t": <epoch s>}
    {"step": 0, "users": 4, "phase": "end", "t": <epoch s>}

Settings (environment; the harness sets them):

    LOADTEST_STEPS          comma-separated user counts (default 4,8,16,32,64)
    LOADTEST_STEP_SECONDS   dwell per step once its users are running (default 30)
    LOADTEST_REACH_TIMEOUT  give up waiting for a step's users after this many seconds and start
                            its dwell anyway (default 30; the log then says "reached_late")
"""

from __future__ import annotations

import json
import os
import time

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.steps = [int(s) for s in os.environ.get("LOADTEST_STEPS", "4,8,16,32,64").split(",") if s.strip()]
        self.dwell = float(os.environ.get("LOADTEST_STEP_SECONDS", "30"))
        self.reach_timeout = float(os.environ.get("LOADTEST_REACH_TIMEOUT", "30"))
        self.log_dir = os.environ.get("LOADTEST_LOG_DIR")
        self.index = 0
        self.step_began = 0.0  # run time when the current step was requested
        self.reached_at: float | None = None  # run time when its users were all running

    def _record(self, phase: str) -> None:
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "steps.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.index, "users": self.steps[self.index],
                                    "phase": phase, "t": round(time.time(), 6)}) + "\n")

    def tick(self):
        if self.index >= len(self.steps):
            return None
        users = self.steps[self.index]
        now = self.get_run_time()
        if self.reached_at is None:
            waited = now - self.step_began
            if self.get_current_user_count() >= users or waited > self.reach_timeout:
                self.reached_at = now
                self._record("reached" if waited <= self.reach_timeout else "reached_late")
        elif now - self.reached_at >= self.dwell:
            self._record("end")
            self.index += 1
            self.step_began, self.reached_at = now, None
            if self.index >= len(self.steps):
                return None
            users = self.steps[self.index]
        # Spawn a whole step within about a second: the ramp is not what we measure.
        return users, max(users, 1)
