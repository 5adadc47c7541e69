# shellcheck shell=bash
# Source on the device machine (the `device` tool): installs carried wheels and makes
# `import inferfleet.worker` resolve to this checkout without an install.
# (no .whl/ carried: nothing to install; bench/ab.sh sources this under `set -e`)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
mkdir -p /tmp/pkg/inferfleet
ln -sfn "$PWD/worker" /tmp/pkg/inferfleet/worker
ln -sfn "$PWD/operator" /tmp/pkg/inferfleet/operator
export PYTHONPATH=/tmp/pkg:/tmp/site:$PYTHONPATH
