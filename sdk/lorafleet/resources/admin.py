"""Operator routes (`/v1/admin/...`), authenticated with the admin token."""

from __future__ import annotations

from ..types import APIKey, BaseModelInfo, Tenant
from ._base import Resource, drop_none


class Tenants(Resource):
    def create(self, name: str, *, max_concurrent_jobs: int | None = None,
               max_queued_jobs: int | None = None, requests_per_minute: int | None = None):
        body = drop_none(name=name, max_concurrent_jobs=max_concurrent_jobs,
                         max_queued_jobs=max_queued_jobs, requests_per_minute=requests_per_minute)
        return self._client._run(self._core.request("POST", "/v1/admin/tenants", json=body,
                                                    auth="admin", cast=Tenant.model_validate))

    def list(self, *, limit: int | None = None, after: str | None = None):
        return self._client._paginate("/v1/admin/tenants", Tenant.model_validate,
                                      {"limit": limit, "after": after}, auth="admin")

    def retrieve(self, tenant_id: str):
        return self._client._run(self._core.request("GET", f"/v1/admin/tenants/{tenant_id}",
                                                    auth="admin", cast=Tenant.model_validate))

    def update(self, tenant_id: str, *, status: str | None = None,
               max_concurrent_jobs: int | None = None, max_queued_jobs: int | None = None,
               requests_per_minute: int | None = None):
        body = drop_none(status=status, max_concurrent_jobs=max_concurrent_jobs,
                         max_queued_jobs=max_queued_jobs, requests_per_minute=requests_per_minute)
        return self._client._run(self._core.request("PATCH", f"/v1/admin/tenants/{tenant_id}",
                                                    json=body, auth="admin",
                                                    cast=Tenant.model_validate))


class APIKeys(Resource):
    def create(self, tenant_id: str, *, name: str | None = None):
        """A new key; its secret ``key`` is in this response only."""
        return self._client._run(self._core.request(
            "POST", f"/v1/admin/tenants/{tenant_id}/api_keys", json=drop_none(name=name),
            auth="admin", cast=APIKey.model_validate))

    def list(self, tenant_id: str, *, limit: int | None = None, after: str | None = None):
        return self._client._paginate(f"/v1/admin/tenants/{tenant_id}/api_keys",
                                      APIKey.model_validate, {"limit": limit, "after": after},
                                      auth="admin")

    def revoke(self, key_id: str):
        return self._client._run(self._core.request("DELETE", f"/v1/admin/api_keys/{key_id}",
                                                    auth="admin", cast=APIKey.model_validate))


class AdminModels(Resource):
    def create(self, id: str, source_uri: str, *, architecture: str | None = None,
               methods: list[str] | None = None, max_rank: int | None = None,
               quantization: str | None = None):
        body = drop_none(id=id, source_uri=source_uri, architecture=architecture, methods=methods,
                         max_rank=max_rank, quantization=quantization)
        return self._client._run(self._core.request("POST", "/v1/admin/models", json=body,
                                                    auth="admin", cast=BaseModelInfo.model_validate))

    def list(self, *, limit: int | None = None, after: str | None = None):
        return self._client._paginate("/v1/admin/models", BaseModelInfo.model_validate,
                                      {"limit": limit, "after": after}, auth="admin")


class Admin(Resource):
    def __init__(self, client):
        super().__init__(client)
        self.tenants = Tenants(client)
        self.api_keys = APIKeys(client)
        self.models = AdminModels(client)
