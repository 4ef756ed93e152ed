"""vlm-serve on Ray Serve (serve/ray_app.py): a local Ray cluster started by
the test, 2 replicas behind Ray's HTTP proxy on 127.0.0.1, driven by the
openai client; answers equal generate() and land on both replicas."""
import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlmedge.demo import scenes

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ray_server(demo_artifact):
    from vlmedge.serve.ray_app import application

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(demo_artifact), replicas=2, cpus_per_replica=0.5,
                              threads=1), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.timeout(600)
def test_two_replicas_answer_like_generate(ray_server, demo_artifact):
    from vlmedge.runtime import VLMSession

    session = VLMSession(demo_artifact, provider="cpu", threads=1)
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    cases = []
    for i in range(6):
        image = scenes.make_scene(scenes.EVAL_SEED_BASE + 120 + i).image
        cases.append((image, session.generate(image, "describe the image.",
                                              max_new_tokens=32).text))

    def one(k):
        image, want = cases[k % len(cases)]
        r = client.chat.completions.with_raw_response.create(
            model="demo", max_tokens=32, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(image)}},
                {"type": "text", "text": "describe the image."}]}])
        body = r.http_response.json()
        return body["choices"][0]["message"]["content"] == want, body["vlmedge"]["replica"]

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(36)))
    assert all(ok for ok, _ in results)
    assert len({replica for _, replica in results}) == 2  # both replicas answered
    stream = client.chat.completions.create(
        model="demo", max_tokens=32, stream=True, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(cases[0][0])}},
            {"type": "text", "text": "describe the image."}]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cases[0][1]
    assert [m.id for m in client.models.list().data] == [demo_artifact.name]
