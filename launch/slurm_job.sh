# The body of every training job that launch.slurm renders (it defines RUN_DIR and TRAIN above).
# One attempt of the job: start the ranks, forward the preemption signal to them, requeue the
# job when training saved a checkpoint on that signal and asked for it (exit EXIT_REQUEUE).
# A requeued job runs this script again with the same job id and run directory and resumes
# from the checkpoint; SLURM_RESTART_COUNT counts the attempts. A finished run never requeues.

EXIT_REQUEUE=75
ATTEMPT=${SLURM_RESTART_COUNT:-0}
EVENTS=$RUN_DIR/slurm/events.jsonl
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/slurm"

event() {  # event NAME [', "key": value' ...]: one JSON line for `launch.slurm --status`
    printf '{"time": "%s", "job": "%s", "attempt": %d, "event": "%s"%s}\n' \
        "$(date +%Y-%m-%dT%H:%M:%S)" "$SLURM_JOB_ID" "$ATTEMPT" "$1" "${2:-}" >>"$EVENTS"
}
latest_checkpoint() { cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none; }

train_pid=
signalled=0
forward_signal() {  # bash runs this trap while it waits for srun; srun passes USR1 to every rank
    signalled=1
    echo "rotalibi: USR1 (preemption or time limit): the ranks save a checkpoint and exit"
    event signal
    if [[ -n $train_pid ]]; then kill -USR1 "$train_pid" 2>/dev/null; fi
}
trap forward_signal USR1

echo "rotalibi: job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST, checkpoint $(latest_checkpoint)"
event start ", \"checkpoint\": \"$(latest_checkpoint)\", \"nodes\": \"$SLURM_JOB_NODELIST\""
"${TRAIN[@]}" &
train_pid=$!
if ((signalled)); then kill -USR1 "$train_pid" 2>/dev/null; fi
while :; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
    wait "$train_pid"
    code=$?
    if ((code > 128)) && kill -0 "$train_pid" 2>/dev/null; then continue; fi
    break
done
event exit ", \"code\": $code, \"checkpoint\": \"$(latest_checkpoint)\""
echo "rotalibi: training exited with code $code at checkpoint $(latest_checkpoint)"

if ((code == EXIT_REQUEUE)); then
    event requeue
    echo "rotalibi: requeueing job $SLURM_JOB_ID; it resumes from $(latest_checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "rotalibi: scontrol requeue failed; resubmit with python -m launch.slurm" >&2
fi
exit "$code"
