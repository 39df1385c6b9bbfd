"""torchrun for the launch scripts: the same arguments and behaviour, but a job that is stopped or
fails ends with one line and a meaningful exit status instead of torchrun's traceback.

    python tools/torchrun.py --standalone --nproc_per_node 8 main.py --data_path DIR ...

- Stopped by a signal (a scheduler's or torchrun's SIGTERM, Ctrl-C): torchrun has already passed the
  signal on to its workers and waited for them (main.py saves a recovery point and exits); the exit
  status is that of the signal (143 for SIGTERM, 130 for SIGINT), as for a single main.py process.
- A worker failed: torchrun's summary of the failures is printed (the workers' own messages are in the
  log above it) and the exit status is the first failed worker's (2 for a user error in main.py).
"""
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main(argv=None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        print(f'torchrun: stopped by {name} after its workers ended', file=sys.stderr, flush=True)
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        print(f'torchrun: {str(failed).strip()}', file=sys.stderr, flush=True)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -9: killed by SIGKILL
    return 0


if __name__ == '__main__':
    sys.exit(main())
