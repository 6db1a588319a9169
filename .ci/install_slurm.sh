#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld, slurmd, client commands) and MUNGE from Debian's
# packages, for the SLURM integration test (tests/test_slurm.py starts its own cluster in a
# temporary directory; nothing is configured or started here). Idempotent and quiet:
# exits 0 at once when the daemons are already on PATH. Needs root (or sudo) and apt-get.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in /usr/sbin

installed() {
  local cmd
  for cmd in slurmctld slurmd sbatch srun squeue scontrol munged munge; do
    command -v "$cmd" >/dev/null || return 1
  done
}
if installed; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "install_slurm: needs root or sudo" >&2; exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install_slurm: needs apt-get (Debian/Ubuntu)" >&2; exit 1
fi

APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"
$APT update -qq >/dev/null
# slurmctld + slurmd + slurm-client (sbatch, squeue, scontrol, srun, ...) and munge;
# no recommends: the slurm-wlm meta package would pull every optional plugin.
$APT install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  slurmctld slurmd slurm-client munge >/dev/null
installed || { echo "install_slurm: SLURM/MUNGE commands missing after the install" >&2; exit 1; }
