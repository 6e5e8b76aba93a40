#!/usr/bin/env bash
# Debian's SLURM and munge, for the job-script tests on a single machine (CI, laptops). Idempotent;
# where they cannot be installed the tests skip and say why.
set -uo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null 2>&1
  $SUDO apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || echo "warning: slurm-wlm could not be installed; the SLURM tests will skip"
fi
exit 0
