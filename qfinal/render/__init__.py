"""Three views of one Report: rich for people, JSON for scripts, JUnit for CI test tabs."""
