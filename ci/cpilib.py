"""ci/cpilib.py: what the python scripts in ci/ share (the bash ones source
ci/lib.sh, which does the same things the same way).

    sys.path.insert(0, os.path.join(ROOT, "ci")); import cpilib
"""
import json
import os
import subprocess
import time

# The director runs the CPI with a cleared environment: PATH and HOME only.
DIRECTOR_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root")}


def request(method, arguments, director_uuid="ci", request_id="cpi-000000", context=None):
    """One request as the director sends it (API version 2), as bytes."""
    ctx = {"director_uuid": director_uuid, "request_id": request_id}
    ctx.update(context or {})
    return json.dumps({"method": method, "arguments": arguments, "context": ctx,
                       "api_version": 2}).encode()


def run(cpi, config, raw_request):
    """Runs CPI on CONFIG as the director does; (completed process, wall ms)."""
    t = time.perf_counter()
    out = subprocess.run([cpi, config], input=raw_request, capture_output=True, env=DIRECTOR_ENV)
    return out, (time.perf_counter() - t) * 1000


class CpiError(Exception):
    pass


def call(cpi, config, method, arguments, **request_args):
    """One call; (result, wall ms, stderr text). Raises CpiError on an error response."""
    out, ms = run(cpi, config, request(method, arguments, **request_args))
    response = json.loads(out.stdout)
    if response["error"] is not None:
        raise CpiError(f"{method} {arguments}: {response['error']}\n{out.stderr.decode()}")
    return response["result"], ms, out.stderr.decode()


def load_json(path):
    with open(path) as f:
        return json.load(f)
