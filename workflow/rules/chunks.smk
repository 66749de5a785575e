# Sample chunks (kvpipe.chunks): the chunk wildcard, the chunks a run's sampling.n makes, and their files.
from kvpipe.chunks import chunk_names, chunk_range

CHUNKS = chunk_names(config["sampling"]["n"], config["run"]["chunk_size"])


wildcard_constraints:
    chunk=r"\d{4}",


def chunk_samples(chunk):
    """[first, end) sample_idx of a chunk: its own range, which does not change once the chunk is full."""
    return list(
        chunk_range(chunk, config["sampling"]["n"], config["run"]["chunk_size"])
    )


def chunk_files(pattern):
    """Input function: a pattern with {chunk} and the job's wildcards, for every chunk of the run."""
    return lambda wc: expand(pattern, chunk=CHUNKS, **wc)


def selection_whole_table(wc):
    """Input function: the whole sample table, for a pair whose selection.max_samples counts its passages."""
    if pair_settings(config, wc.pair, "selection")["max_samples"] is None:
        return []
    return one(rules.sample_dataset.output.samples, dataset=wc.dataset)
