#!/usr/bin/env bash
# Train mmjax on a Cloud TPU VM slice (e.g. v5p-64): create the slice if it is
# missing, copy this checkout to every worker, install, start `mmjax train` on
# all workers in the background, then follow worker 0's log.
#
#   bash launch/tpu_pod.sh --name clip-pod --zone us-east5-a \
#       --accelerator v5p-64 --version v2-alpha-tpuv5 [--project P] [--spot] \
#       --config configs/clip_b16.py --workdir gs://BUCKET/runs/clip_b16 \
#       [--dry-run] [-- --config.batch_size=4096 ...]
#
# Everything after `--` is passed to `mmjax train` unchanged.
# Running the same command again resumes from the latest checkpoint in
# --workdir (a spot slice that was preempted is deleted and created again).
#
#   --dry-run   print each command (one per line, prefixed "+ ") instead of
#               running it; exits 0.
#   --stop      send SIGTERM to `mmjax train` on every worker (it saves a
#               checkpoint and exits), then return.
#   --no-follow start the run and return without following the log.
#
# On the workers the run lives in ~/mmjax; its log is ~/mmjax_train.log and
# its process id ~/mmjax_train.pid.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOG=mmjax_train.log
PIDFILE=mmjax_train.pid

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

NAME="" ZONE="" ACCELERATOR="" VERSION="" PROJECT="" CONFIG="" WORKDIR=""
SPOT=0 DRY_RUN=0 STOP=0 FOLLOW=1
EXTRA=()
while (($#)); do
  flag=$1
  case $flag in
    --name|--zone|--accelerator|--version|--project|--config|--workdir)
      (($# >= 2)) && [[ -n $2 ]] || die "$flag needs a value"
      value=$2; shift 2 ;;
    --name=*|--zone=*|--accelerator=*|--version=*|--project=*|--config=*|--workdir=*)
      value=${flag#*=}; flag=${flag%%=*}; shift ;;
    --spot) SPOT=1; shift; continue ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --stop) STOP=1; shift; continue ;;
    --no-follow) FOLLOW=0; shift; continue ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$flag' (mmjax train flags go after --; see --help)" ;;
  esac
  case $flag in
    --name) NAME=$value ;; --zone) ZONE=$value ;; --accelerator) ACCELERATOR=$value ;;
    --version) VERSION=$value ;; --project) PROJECT=$value ;; --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (the TPU VM name)"
[[ -n $ZONE ]] || die "--zone is required (e.g. us-east5-a)"
if ((!STOP)); then
  [[ -n $ACCELERATOR ]] || die "--accelerator is required (e.g. v5p-64)"
  [[ -n $VERSION ]] || die "--version is required (TPU runtime, e.g. v2-alpha-tpuv5)"
  [[ -n $CONFIG ]] || die "--config is required (e.g. configs/clip_b16.py)"
  [[ -n $WORKDIR ]] || die "--workdir is required (e.g. gs://BUCKET/runs/NAME)"
  config_file=${CONFIG%%:*}
  [[ -f $REPO/$config_file ]] \
    || die "--config $CONFIG: $config_file not found in $REPO (give a path like configs/clip_b16.py)"
  for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    [[ $arg == --config.*=* ]] \
      || die "extra argument '$arg' after -- is not --config.KEY=VALUE"
  done
  # Every worker writes checkpoints: they must share one location.
  [[ $WORKDIR == gs://* ]] \
    || echo "tpu_pod.sh: warning: --workdir $WORKDIR is not gs://; every worker must see the same directory" >&2
fi

# Flags shared by every gcloud call.
where=(--zone="$ZONE")
[[ -n $PROJECT ]] && where+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

# Print the command ("+ " then each word shell-quoted), then run it unless --dry-run.
run() {
  local line
  line=$(printf ' %q' "$@")
  if ((DRY_RUN)); then
    printf '+%s\n' "$line"
  else
    printf '+%s\n' "$line" >&2
    "$@"
  fi
}

# A shell-quoted command line for the workers' shell.
quote() { local out; out=$(printf ' %q' "$@"); printf '%s' "${out# }"; }

if ((STOP)); then
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all \
    --command="test -f \$HOME/$PIDFILE && kill -TERM \$(cat \$HOME/$PIDFILE) || true"
  exit 0
fi

# 1. The slice: reuse it, or create it (again, if a spot slice was preempted).
create=("${tpu[@]}" create "$NAME" "${where[@]}" --accelerator-type="$ACCELERATOR"
        --version="$VERSION")
((SPOT)) && create+=(--spot)
if ((DRY_RUN)); then
  run "${tpu[@]}" describe "$NAME" "${where[@]}" --format='value(state)'
  run "${create[@]}"
else
  state=$(run "${tpu[@]}" describe "$NAME" "${where[@]}" --format='value(state)' 2>/dev/null || true)
  case $state in
    "") run "${create[@]}" ;;
    PREEMPTED|TERMINATED)
      run "${tpu[@]}" delete "$NAME" "${where[@]}" --quiet
      run "${create[@]}" ;;
    *) echo "tpu_pod.sh: reusing $NAME (state $state)" >&2 ;;
  esac
fi

# 2. Code: a tarball of this checkout (uncommitted edits included) on every worker.
tarball=${TMPDIR:-/tmp}/mmjax-$NAME.tar.gz
run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=mmjax_runs \
  --exclude=__pycache__ --exclude='*.egg-info' .
run "${tpu[@]}" scp "$tarball" "$NAME:mmjax.tar.gz" "${where[@]}" --worker=all

# 3. Install (the remote extra reads gs:// data shards).
run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all \
  --command="mkdir -p mmjax && tar -xzf mmjax.tar.gz -C mmjax && cd mmjax && python3 -m pip install -q -e '.[tpu,remote]'"

# 4. Start training on all workers, detached from the ssh session.
train=$(quote mmjax train --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")
# `;` (not `&&`) before nohup so that `&` backgrounds mmjax alone and $! is its pid.
start="export PATH=\$HOME/.local/bin:\$PATH; cd mmjax || exit 1; nohup $train > \$HOME/$LOG 2>&1 < /dev/null & echo \$! > \$HOME/$PIDFILE"
run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=all --command="$start"

# 5. Follow worker 0's log (Ctrl-C stops following, not training).
if ((FOLLOW)); then
  run "${tpu[@]}" ssh "$NAME" "${where[@]}" --worker=0 --command="tail -n +1 -F \$HOME/$LOG"
fi
