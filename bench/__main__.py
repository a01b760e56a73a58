import sys

if sys.argv[1:2] == ["soak"]:  # python -m bench soak ...: the long run (bench/soak.py)
    from bench.soak import main as soak

    sys.exit(soak(sys.argv[2:]))

if sys.argv[1:2] == ["plots"]:  # python -m bench plots RESULT_DIR: draw a saved run's plots again
    from bench.plots import main as plots

    sys.exit(plots(sys.argv[2:]))

from bench.cli import main

sys.exit(main())
