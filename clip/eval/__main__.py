import sys
from clip.eval.cli import main
sys.exit(main())
