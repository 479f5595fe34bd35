"""What ships: SavedModel and LiteRT files (`export`), XNNPACK's sparse path
(`deploy_report`, `presets`)."""
