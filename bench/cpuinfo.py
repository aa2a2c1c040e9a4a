"""The CPU a benchmark ran on, as recorded in every result file: lscpu's model name alone does not
tell machines apart ("AMD EPYC" is a Zen 3 and a Zen 5 here), so the family, model and the vector
instruction sets our kernels choose between are recorded beside it."""

import platform


def cpu_description():
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            if ":" not in line:
                if fields:
                    break
                continue
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    except OSError:
        return platform.processor()
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx512f", "avx512_bf16", "avx2", "fma") if f in flags]
    return "%s, family %s model %s, %s" % (
        fields.get("model name", platform.processor()),
        fields.get("cpu family", "?"),
        fields.get("model", "?"),
        " ".join(isa) if isa else "no AVX2",
    )


if __name__ == "__main__":
    print(cpu_description())
