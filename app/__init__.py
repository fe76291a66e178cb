"""The application layer, above the assets: the Dagster Definitions (jobs, sensor, schedule), the demo
and the `fusemix` command line. Nothing below imports from here."""
