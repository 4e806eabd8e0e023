"""The local web app (`cxr app`): upload page, study pages, runs browser and a JSON API.

One process loads the registered model once (`tasks.scoring.Scorer`) and scores uploads with the
same loader, bundle, thresholds, out-of-distribution gate and row schema as `cxr score`;
uploads that arrive together share one forward pass. Pages and the API never run a Prefect flow.
"""
