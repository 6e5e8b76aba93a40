"""The Hugging Face Hub, through `huggingface_hub`: publishing a run's checkpoints as revisions
of one repo, and pulling models back.

    client.py     repo ids, the token, the HfApi the tools share
    retry.py      backoff with jitter on rate limits (429) and server errors (5xx)
    revisions.py  a run's checkpoints as the files of each revision (strata and/or HF format)
    card.py       the model card (README.md) from a checkpoint's metadata and the run's logs
    upload.py     one revision: compare with the branch on the Hub, commit what differs
    download.py   a model snapshot through the huggingface_hub cache, with its commit hash
"""
