import sys

from example_project.demo.cli import main

sys.exit(main())
