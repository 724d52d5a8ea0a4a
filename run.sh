#!/usr/bin/env bash
# moa-jittor: one script, two commands (both idempotent, nothing to do by hand):
#   bash run.sh        set up, then run the main job (the embedded demo)
#   bash run.sh test   set up, then run the test suite
#   bash run.sh moe    set up, then the MoE-LLM demo (demo_moe.py: tokenizer, MoE vs dense pretraining, SFT)
#   bash run.sh upcycle  set up, then the Dense2MoE demo (demo_upcycle.py: dense LLaMA -> upcycled MoE, trained on)
#   bash run.sh seq2seq  set up, then the encoder-decoder MoE demo (demo_seq2seq.py: BPE tokenizer, MoE vs dense)
#   bash run.sh moefy  set up, then the MoEfication demo (moefy_demo.py: dense FFN neurons -> experts + routers)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
MODE=${1:-demo}
shift || true

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -f /usr/include/mpi.h ] || [ -n "$(ls /usr/lib/*/openmpi/include/mpi.h 2>/dev/null)" ] || need_apt+=(libopenmpi-dev)
[ -f /usr/include/dnnl.hpp ] || need_apt+=(libdnnl-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
REQ=requirements.txt
[ "$MODE" = test ] && REQ=requirements-test.txt
STAMP=.venv/.installed-$(cat requirements.txt $REQ | sha1sum | cut -c1-12)
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing Python requirements ($REQ)"
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQ"
  touch "$STAMP"
fi
# First import compiles Jittor's core (about 2 minutes on a new machine) and links oneDNN; cached afterwards.
.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from Utils.runtime import import_jittor, onednn_status; import_jittor(); print('[setup] jittor ready, oneDNN', onednn_status())"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
case "$MODE" in
  test) exec .venv/bin/python -m pytest -q tests "$@" ;;
  demo) exec .venv/bin/python demo.py "$@" ;;
  moe) exec .venv/bin/python demo_moe.py "$@" ;;
  upcycle) exec .venv/bin/python demo_upcycle.py "$@" ;;
  seq2seq) exec .venv/bin/python demo_seq2seq.py "$@" ;;
  moefy) exec .venv/bin/python moefy_demo.py "$@" ;;
  *) echo "usage: bash run.sh [test|moe|upcycle|seq2seq|moefy] [args...]" >&2; exit 2 ;;
esac
