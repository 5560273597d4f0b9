"""onnxruntime-genai greedy generation, as a user of an LM artifact writes it (for the tests)."""


def og_greedy(model, adapters, ids: list[int], adapter: str | None, n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` from og ``model``, with ``adapter`` of ``adapters`` active."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    if adapter:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids)
    got = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    return got
