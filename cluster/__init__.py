"""The declarative cluster config: its schema, loading from YAML and rendering to Serve configs."""
