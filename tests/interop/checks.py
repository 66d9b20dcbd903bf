"""The PASS/FAIL lines run.sh counts: each check runs, is reported on one line, and the run goes on."""

from __future__ import annotations

import sys
import traceback


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def __call__(self, name: str, fn) -> object:
        """Runs fn; a result of False or an exception is a FAIL (with its traceback under -v). Returns fn's result, or None."""
        try:
            result = fn()
            if result is False:
                raise AssertionError("returned False")
            self.passed += 1
            print(f"PASS {name}", flush=True)
            return result
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            if "-v" in sys.argv:
                traceback.print_exc()
            return None
