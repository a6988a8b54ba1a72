"""The shipped recipes (YAML): ``distca train tiny.yaml`` finds them from any directory."""
