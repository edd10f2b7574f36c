# The body of every training job that launch.slurm renders: above it, the job (or the array
# task, chosen by SLURM_ARRAY_TASK_ID) defines RUN_DIR, JOB (its id as squeue shows it: "<array
# id>_<task>" for an array task) and TRAIN; the config's setup lines and environment go in place
# of the placeholder line below. One attempt of the job: start the ranks, forward a stop signal
# to them, and requeue the job when training saved a checkpoint on it and asked for a requeue
# (exit EXIT_REQUEUE). The requeued job runs this script again with the same job id and run
# directory and resumes from that checkpoint; SLURM_RESTART_COUNT counts the attempts. A
# finished run never requeues.

EXIT_REQUEUE=75
ATTEMPT=${SLURM_RESTART_COUNT:-0}
EVENTS=$RUN_DIR/slurm/events.jsonl
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/slurm"

event() {  # event NAME [', "key": value' ...]: one JSON line for `launch.slurm --status`
    printf '{"time": "%s", "job": "%s", "attempt": %d, "event": "%s"%s}\n' \
        "$(date +%Y-%m-%dT%H:%M:%S)" "$JOB" "$ATTEMPT" "$1" "${2:-}" >>"$EVENTS"
}
latest_checkpoint() { cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none; }

train_pid=
signalled=0
forward_signal() {  # bash runs this trap while it waits for srun; srun passes USR1 to every rank
    signalled=1
    echo "rotalibi: SIG$1 (preemption, time limit or cancel): the ranks save a checkpoint and exit"
    event signal ", \"signal\": \"$1\""
    if [[ -n $train_pid ]]; then kill -USR1 "$train_pid" 2>/dev/null; fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM  # preemption and scancel send TERM: keep waiting for the save

@SETUP@
echo "rotalibi: job $JOB attempt $ATTEMPT on $SLURM_JOB_NODELIST, checkpoint $(latest_checkpoint)"
event start ", \"checkpoint\": \"$(latest_checkpoint)\", \"nodes\": \"$SLURM_JOB_NODELIST\""
if ((signalled)); then  # stopped before training started: nothing to save
    code=$EXIT_REQUEUE
else
    "${TRAIN[@]}" &
    train_pid=$!
    while :; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
        wait "$train_pid"
        code=$?
        if ((code > 128)) && kill -0 "$train_pid" 2>/dev/null; then continue; fi
        break
    done
fi
event exit ", \"code\": $code, \"checkpoint\": \"$(latest_checkpoint)\""
echo "rotalibi: training exited with code $code at checkpoint $(latest_checkpoint)"

# Requeue when training asks for it, or when a signalled run died some other way (e.g. the
# signal came while the ranks were still starting up): only complete checkpoints are ever
# resumed from. A finished run (code 0) never requeues.
if ((code == EXIT_REQUEUE || (signalled && code != 0))); then
    event requeue
    echo "rotalibi: requeueing job $JOB; it resumes from $(latest_checkpoint)"
    # By JOB, not SLURM_JOB_ID: the array task that holds the array's own id would requeue every
    # task of the array with it, finished ones included.
    scontrol requeue "$JOB" && exit 0
    echo "rotalibi: scontrol requeue refused (a cancelled job, or SLURM requeues it itself);" \
        "to go on, submit the run again with python -m launch.slurm" >&2
fi
exit "$code"
