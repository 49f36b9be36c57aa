"""The data plane's machinery shared by S3 and Azure: where a data plane runs (worker
threads or the upload worker process), what crosses to it, and how a part's bytes are read
and hashed. Neither store's SDK is imported here."""
