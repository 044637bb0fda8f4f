"""The seed's read models, written against the public Projection API like any user's would be."""
