"""The clinician web app: classify, explain and correct lesion images at a site."""
