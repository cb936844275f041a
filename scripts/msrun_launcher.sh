#!/bin/bash
# Launch a command on N local (or multi-node) workers with MindSpore's msrun, MindFormers-style:
#
#   bash scripts/msrun_launcher.sh "run_mindformer.py ... --use_parallel True" [WORKER_NUM]
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   bash scripts/msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
#
# Argument order and defaults follow MindFormers' scripts/msrun_launcher.sh, except JOIN, which defaults to
# True here: msrun then waits for the workers and this script exits non-zero when any rank fails (with
# JOIN=False msrun returns at once and nobody reports the job's result). Rank 0's log is echoed to the
# console (--tail_worker_log 0) so the streamed answer appears on stdout; every rank's log is in LOG_DIR.

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="True"
CLUSTER_TIME_OUT=7200

usage() {
  echo "Usage: bash msrun_launcher.sh EXECUTE_ORDER [WORKER_NUM]" >&2
  echo "       bash msrun_launcher.sh EXECUTE_ORDER WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT" >&2
  echo "       bash msrun_launcher.sh EXECUTE_ORDER WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT" >&2
}

SCRIPTS_ROOT=$(realpath "$(dirname "$0")")
PROJECT_ROOT=$(realpath "$SCRIPTS_ROOT/..")
export PYTHONPATH="$PROJECT_ROOT:${PYTHONPATH:-}"
# Keep MindSpore's C++ INFO logging out of the workers' logs unless asked for.
export GLOG_v="${GLOG_v:-3}"

case $# in
  1) ;;
  2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
  6) WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
  9) WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6; LOG_DIR=$7; JOIN=$8
     CLUSTER_TIME_OUT=$9 ;;
  *) usage; echo "msrun_launcher.sh: error: expected 1, 2, 6 or 9 arguments, got $#" >&2; exit 2 ;;
esac

for pair in "WORKER_NUM=$WORKER_NUM" "LOCAL_WORKER=$LOCAL_WORKER" "MASTER_PORT=$MASTER_PORT" \
            "NODE_RANK=$NODE_RANK"; do
  if [[ ! ${pair#*=} =~ ^[0-9]+$ ]]; then
    echo "msrun_launcher.sh: error: ${pair%%=*} must be a whole number, got '${pair#*=}'" >&2; exit 2
  fi
done
if [[ ! $CLUSTER_TIME_OUT =~ ^-?[0-9]+$ ]]; then
  echo "msrun_launcher.sh: error: CLUSTER_TIME_OUT must be a number of seconds, got '$CLUSTER_TIME_OUT'" >&2; exit 2
fi
if [ "$JOIN" != "True" ] && [ "$JOIN" != "False" ]; then
  echo "msrun_launcher.sh: error: JOIN must be True or False, got '$JOIN'" >&2; exit 2
fi
if [ "$WORKER_NUM" -lt 1 ] || [ "$LOCAL_WORKER" -lt 1 ] || [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "msrun_launcher.sh: error: need 1 <= LOCAL_WORKER ($LOCAL_WORKER) <= WORKER_NUM ($WORKER_NUM)" >&2; exit 2
fi

# A relative script path is taken from the current folder, else from the project root.
read -r -a ORDER <<< "$1"
if [ ${#ORDER[@]} -eq 0 ]; then
  echo "msrun_launcher.sh: error: EXECUTE_ORDER is empty" >&2; exit 2
fi
SCRIPT=${ORDER[0]}
if [ ! -f "$SCRIPT" ] && [ -f "$PROJECT_ROOT/$SCRIPT" ]; then
  SCRIPT="$PROJECT_ROOT/$SCRIPT"
fi
if [ ! -f "$SCRIPT" ]; then
  echo "msrun_launcher.sh: error: script '${ORDER[0]}' not found" >&2; exit 2
fi
REST=${1#"${ORDER[0]}"}
# The rest of EXECUTE_ORDER is shell words (quoted prompts): split it the way the shell would, once, into an
# array; every path below is passed as one word, whatever spaces it holds.
if ! eval "ARGS=($REST)" 2>/dev/null; then
  echo "msrun_launcher.sh: error: EXECUTE_ORDER is not valid shell words (unbalanced quotes?): $1" >&2; exit 2
fi

# msrun reports a failed job with os.system(f"cat {LOG_DIR}/scheduler.log | grep ..."), unquoted: a space only
# makes that cat fail (its complaint is dropped below), but shell syntax in LOG_DIR would be run as a command.
if [[ $LOG_DIR == *[\;\&\|\$\`\<\>\(\)\{\}\*\?\[\]\!\'\"\\~#$'\n']* ]]; then
  echo "msrun_launcher.sh: error: LOG_DIR '$LOG_DIR' holds shell syntax (one of ;&|\$\`<>(){}*?[]!'\"\\~# or a newline), which msrun passes to a shell unquoted: choose a folder name without it" >&2
  exit 2
fi

# msrun's scheduler listens on MASTER_PORT: a port already taken would make every rank wait out
# CLUSTER_TIME_OUT and then fail without naming it. Checked on the node that hosts the scheduler (bind() to
# an address of another machine fails with EADDRNOTAVAIL: nothing to check there).
port_problem=$(python3 - "$MASTER_ADDR" "$MASTER_PORT" <<'PY'
import errno, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
if not 1 <= port <= 65535:
    print(f"MASTER_PORT must be 1..65535, got {port}")
    sys.exit()
try:
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
except OSError:
    sys.exit()
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as a server binds: TIME_WAIT is not "in use"
    try:
        s.bind((addr, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"MASTER_PORT {port} on {addr} is already in use (another job or program listens there): "
                  f"pass a free port as MASTER_PORT")
        elif e.errno == errno.EACCES:
            print(f"MASTER_PORT {port} on {addr} cannot be used ({e.strerror}): pass a port above 1023")
PY
)
if [ -n "$port_problem" ]; then
  echo "msrun_launcher.sh: error: $port_problem" >&2; exit 2
fi

MSRUN=(msrun "--worker_num=$WORKER_NUM" "--local_worker_num=$LOCAL_WORKER" "--master_addr=$MASTER_ADDR"
       "--master_port=$MASTER_PORT")
if [ "$WORKER_NUM" != "$LOCAL_WORKER" ]; then
  MSRUN+=("--node_rank=$NODE_RANK")
fi
MSRUN+=("--log_dir=$LOG_DIR" "--join=$JOIN" "--cluster_time_out=$CLUSTER_TIME_OUT" "--tail_worker_log=0")

echo "Running Command: ${MSRUN[*]@Q} ${SCRIPT@Q}${ARGS[*]:+ ${ARGS[*]@Q}}" >&2
echo "Please check log files in $(realpath -m "$LOG_DIR") (worker_K.log per rank)" >&2
# msrun's own Python traceback on a failed job ("Distributed job exited with exception") is noise: keep its last
# line, drop the frames, and drop the complaint of msrun's unquoted `cat LOG_DIR/scheduler.log` when LOG_DIR has a
# space. Each rank's message is in its log; the last line below quotes them.
"${MSRUN[@]}" "$SCRIPT" "${ARGS[@]}" \
  2> >(awk '/^Traceback \(most recent call last\):/ {tb=1; next} tb && /^[ \t]/ {next} /^cat: .*: No such file or directory$/ {next} {tb=0; print; fflush()}' >&2)
status=$?
wait $! 2>/dev/null
if [ $status -ne 0 ]; then
  reasons=""
  for log in "$LOG_DIR"/worker_*.log; do
    [ -f "$log" ] || continue
    line=$(grep -a -E '^[A-Za-z_.]+: error: ' "$log" | tail -n 1)
    if [ -n "$line" ] && [[ $reasons != *"${line#*: error: }"* ]]; then
      reasons="$reasons $(basename "$log" .log): ${line#*: error: };"
    fi
  done
  [ -n "$reasons" ] || reasons=" no rank reported an error (killed, or crashed: see its log);"
  echo "msrun_launcher.sh: error: the distributed job failed (exit $status):$reasons see $(realpath -m "$LOG_DIR")/worker_*.log" >&2
fi
exit $status
