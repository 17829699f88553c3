"""`python -m kubeforge.reference`: one reference-model replica.

Loads the job's model (the initial policy) with the trainer's own code, frozen, and serves

    POST /logprobs   body: a batch in its wire form (kubeforge.batch) -> ref_logprobs (reference/client.py)

/logprobs needs the job token (kubeforge.auth, checked by the role server).
"""

import asyncio

from fastapi import HTTPException, Request, Response

from kubeforge import limits, serving
from kubeforge.batch import BatchError, TrainBatch
from kubeforge.reference.client import CONTENT_TYPE, encode_logprobs
from kubeforge.reference.replica import ReferenceModel


async def run(server: serving.RoleServer) -> None:
    server.set_not_ready("loading the reference model")
    ctx = server.ctx
    reference = await asyncio.to_thread(ReferenceModel, ctx)

    @server.app.post("/logprobs")
    async def logprobs(request: Request) -> Response:
        try:
            batch = TrainBatch.decode(await request.body())
            limits.check_rows(batch.rows)
            reference.check(batch)
        except BatchError as e:
            raise HTTPException(400, f"bad batch: {e}") from None
        values = await asyncio.to_thread(reference.logprobs, batch)
        return Response(encode_logprobs(values), media_type=CONTENT_TYPE)

    await serving.serve_forever(server)


if __name__ == "__main__":
    serving.main(run)
