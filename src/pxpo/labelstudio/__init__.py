"""Label Studio adapter: a REST client and the brush-format conversion (docs/labelling.md)."""
