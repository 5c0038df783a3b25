# Job resources come from the config (resources.<kind>, falling back to resources.default), so the
# model size decides them; the cluster profile only knows the cluster.


def res(kind, key):
    """Resource `key` of job kind `kind`, falling back to resources.default."""
    resources = config["resources"]
    return resources.get(kind, {}).get(key, resources["default"][key])


def resources_for(kind):
    """The resources block of a job kind (threads are set separately with `threads:`)."""
    return {
        "mem_mb": res(kind, "mem_mb"),
        "runtime": res(kind, "runtime"),
        "gpus": res(kind, "gpus"),
    }
