{{/*
Database connections: each API and scheduler pod opens up to pool.size + pool.maxOverflow
connections (service/db/session.py). The sum over every pod that can exist at once must fit the
server's max_connections, or a scale-up (or a rolling update) ends in "too many clients" for
everyone. Counted: API pods at the HPA's maximum when autoscaling (else replicas) plus one
rolling-update surge pod, scheduler replicas plus one surge pod, and database.reservedConnections
(migrations hook, operators, the server's own reserved slots).
*/}}
{{- define "lorafleet.database.connections" -}}
{{- $db := .Values.database -}}
{{- $apiPods := int .Values.api.replicas -}}
{{- if .Values.api.autoscaling.enabled -}}
{{- $apiPods = max $apiPods (int .Values.api.autoscaling.maxReplicas) | int -}}
{{- end -}}
{{- $api := mul (add1 $apiPods) (add $db.pool.api.size $db.pool.api.maxOverflow) -}}
{{- $scheduler := mul (add1 (int .Values.scheduler.replicas)) (add $db.pool.scheduler.size $db.pool.scheduler.maxOverflow) -}}
{{- add $api $scheduler $db.reservedConnections -}}
{{- end }}

{{/* LORAFLEET_DB_* for one role's pool; fails the render when the fleet would exceed the budget. */}}
{{- define "lorafleet.env.databasePool" -}}
{{- $root := .root -}}
{{- $db := $root.Values.database -}}
{{- $need := include "lorafleet.database.connections" $root | int -}}
{{- if gt $need (int $db.maxConnections) -}}
{{- fail (printf "database connections: API and scheduler pods may open %d, above database.maxConnections=%d; lower database.pool.*.size/maxOverflow or replicas (api.autoscaling.maxReplicas), or raise the budget" $need (int $db.maxConnections)) -}}
{{- end -}}
{{- $pool := index $db.pool .role -}}
- name: LORAFLEET_DB_POOL_SIZE
  value: {{ $pool.size | quote }}
- name: LORAFLEET_DB_MAX_OVERFLOW
  value: {{ $pool.maxOverflow | quote }}
- name: LORAFLEET_DB_POOL_TIMEOUT_S
  value: {{ $pool.timeoutSeconds | quote }}
- name: LORAFLEET_DB_CONNECT_TIMEOUT_S
  value: {{ $db.connectTimeoutSeconds | quote }}
- name: LORAFLEET_DB_STATEMENT_TIMEOUT_S
  value: {{ $db.statementTimeoutSeconds | quote }}
{{- end }}
