"""gRPC plumbing shared by the gateway and the worker."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.sinkserve.v1 import sinkserve_pb2 as pb
from worker import errors

# Domain errors and the one status code each maps to.
STATUS_OF_ERROR: dict[type[errors.SinkserveError], grpc.StatusCode] = {
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SessionBusy: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.SnapshotRefused: grpc.StatusCode.DATA_LOSS,
}


def status_of(error: errors.SinkserveError) -> grpc.StatusCode:
    for kind, code in STATUS_OF_ERROR.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_message(code: grpc.StatusCode, message: str) -> pb.ServerMessage:
    """An in-stream refusal: the stream and the session carry on."""
    return pb.ServerMessage(error=pb.Error(code=code.value[0], message=message))


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: list[str]
) -> health.aio.HealthServicer:
    """Serve grpc.health.v1 and reflection; every service starts SERVING."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, service_names: list[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


SESSIONS_SERVICE = pb.DESCRIPTOR.services_by_name["Sessions"].full_name
WORKER_CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["WorkerControl"].full_name
