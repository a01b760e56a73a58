import sys

if sys.argv[1:2] == ["soak"]:  # python -m bench soak ...: the long run (bench/soak.py)
    from bench.soak import main as soak

    sys.exit(soak(sys.argv[2:]))

from bench.cli import main

sys.exit(main())
