"""Plot a run's training curves (loss, learning rate, validation Acc@1/Acc@5 per epoch) to a PNG.

    python tools/plot_curves.py output/train/my-run          # writes output/train/my-run/curves.png
    python tools/plot_curves.py output/train/my-run/summary.csv --out curves.png

main.py writes the same plot to <run dir>/curves.png when training ends; this command redraws it for
any run, also one still training. The drawing lives in utils/reporting.py (`plot_curves`).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.reporting import CURVES_FILE, SUMMARY_FILE, plot_curves  # noqa: E402

__all__ = ['plot_curves', 'main']


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('run', help='run directory holding summary.csv, or the summary.csv file itself')
    parser.add_argument('--out', default=None, help='PNG to write (default: curves.png next to summary.csv)')
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = Path(args.run)
    summary_csv = run / SUMMARY_FILE if run.is_dir() else run
    out_png = Path(args.out) if args.out else summary_csv.parent / CURVES_FILE
    try:
        written = plot_curves(summary_csv, out_png)
    except (OSError, ValueError) as err:
        print(f'plot_curves: error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {written}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
