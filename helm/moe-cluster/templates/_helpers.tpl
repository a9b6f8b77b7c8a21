{{/*
Names, labels, images and the pod pieces every component shares.
Kubernetes names and label values are cut to 63 characters with no trailing '-'.
*/}}

{{- define "moe-cluster.name" -}}
{{- default .Chart.Name .Values.global.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-cluster.fullname" -}}
{{- if .Values.global.fullnameOverride }}
{{- .Values.global.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.global.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", the full name cut so that the whole stays within 63 characters.
Call with (list $ "suffix"). */}}
{{- define "moe-cluster.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $room := sub 62 (len $suffix) | int }}
{{- printf "%s-%s" (include "moe-cluster.fullname" $root | trunc $room | trimSuffix "-") $suffix }}
{{- end }}

{{- define "moe-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-cluster.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" | quote }}
{{- end }}

{{- define "moe-cluster.labels" -}}
helm.sh/chart: {{ include "moe-cluster.chart" . | quote }}
{{ include "moe-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: "moe-cluster"
{{- range $key, $value := .Values.global.commonLabels }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Selector labels of one component. Call with (list $ "router"). */}}
{{- define "moe-cluster.componentSelectorLabels" -}}
{{ include "moe-cluster.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 | quote }}
{{- end }}

{{/* Labels of one component's objects and pods. Call with (list $ "router"). */}}
{{- define "moe-cluster.componentLabels" -}}
{{ include "moe-cluster.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 | quote }}
{{- end }}

{{- define "moe-cluster.serviceAccountName" -}}
{{- if .Values.global.serviceAccount.create }}
{{- default (include "moe-cluster.fullname" .) .Values.global.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.global.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Names of the Ray pieces: a RayCluster name leaves room for KubeRay's "-head-svc" and pod suffixes. */}}
{{- define "moe-cluster.rayClusterName" -}}
{{- include "moe-cluster.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "moe-cluster.rayHeadName" -}}
{{- include "moe-cluster.componentName" (list . "ray-head") }}
{{- end }}

{{/* The Ray worker Deployment (standalone) and PodDisruptionBudget of one group. Call with (list $ $group). */}}
{{- define "moe-cluster.rayWorkerName" -}}
{{- $root := index . 0 }}
{{- printf "%s-worker-%s" (include "moe-cluster.fullname" $root | trunc 36 | trimSuffix "-") (index . 1).name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The head's GCS address the router and the workers join: KubeRay's head Service or the chart's. */}}
{{- define "moe-cluster.rayAddress" -}}
{{- if eq .Values.ray.mode "kuberay" }}
{{- printf "%s-head-svc.%s.svc:%d" (include "moe-cluster.rayClusterName" .) .Release.Namespace (int .Values.ray.gcsPort) }}
{{- else }}
{{- printf "%s.%s.svc:%d" (include "moe-cluster.rayHeadName" .) .Release.Namespace (int .Values.ray.gcsPort) }}
{{- end }}
{{- end }}

{{- define "moe-cluster.routerHost" -}}
{{- printf "%s.%s.svc" (include "moe-cluster.componentName" (list . "router")) .Release.Namespace }}
{{- end }}

{{/*
An image reference under global.imageRegistry; a digest pins it (repository:tag@digest).
Call with (dict "root" $ "image" .Values.image).
*/}}
{{- define "moe-cluster.image" -}}
{{- $repository := .image.repository }}
{{- with .root.Values.global.imageRegistry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- $tag := .image.tag | default .root.Chart.AppVersion | toString }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" $repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}
{{- end }}

{{/* Pull policy: as given, else IfNotPresent for a digest (immutable) and Always for a tag. */}}
{{- define "moe-cluster.pullPolicy" -}}
{{- .pullPolicy | default (ternary "IfNotPresent" "Always" (not (empty .digest))) }}
{{- end }}

{{- define "moe-cluster.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checkov skips stated where the objects are rendered, each with its reason. Only what the values
make necessary is skipped: the digest check only while an image has no digest.
*/}}
{{- define "moe-cluster.checkovSkips" -}}
{{- $skips := list }}
{{- $undigested := not .Values.image.digest }}
{{- if and (eq .Values.model.source "image") (not .Values.model.image.digest) }}
{{- $undigested = true }}
{{- end }}
{{- if $undigested }}
{{- $skips = append $skips "CKV_K8S_43=image.digest is site-specific: the image is built and pushed to the operator's own registry, so only the operator knows its digest; set image.digest (and model.image.digest) to pin it, and this skip disappears" }}
{{- end }}
{{- range $index, $skip := $skips }}
checkov.io/skip{{ add1 $index }}: {{ $skip | quote }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security profile, pod level. */}}
{{- define "moe-cluster.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.global.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.global.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.global.securityContext.fsGroup }}
fsGroup: {{ . }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The restricted Pod Security profile, container level (every container and init container). */}}
{{- define "moe-cluster.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
{{- with .Values.global.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.global.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment of every moe-cluster and Ray container: writable paths live on the /tmp emptyDir. */}}
{{- define "moe-cluster.env" -}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.ray.auth.existingSecret }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: /etc/moe-cluster/ray-auth/{{ .Values.ray.auth.key }}
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{/* Volumes every moe-cluster and Ray pod has: /tmp scratch, /dev/shm for Ray, the Ray token. */}}
{{- define "moe-cluster.baseVolumes" -}}
- name: scratch
  emptyDir:
    sizeLimit: {{ .Values.global.scratchSizeLimit | quote }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSizeLimit | quote }}
{{- with .Values.ray.auth.existingSecret }}
- name: ray-auth
  secret:
    secretName: {{ . | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "moe-cluster.baseVolumeMounts" -}}
- name: scratch
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .Values.ray.auth.existingSecret }}
- name: ray-auth
  mountPath: /etc/moe-cluster/ray-auth
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes of the pods that run expert code (router, workers): the model (an existing claim, a
node directory, or an emptyDir filled from the weights image) and the expert dispatch certificate. */}}
{{- define "moe-cluster.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName | quote }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path | quote }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.image.sizeLimit | quote }}
{{- end }}
{{- with .Values.tls.experts.existingSecret }}
- name: expert-tls
  secret:
    secretName: {{ . | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "moe-cluster.modelVolumeMount" -}}
- name: model
  mountPath: /models
  readOnly: true
{{- if .Values.tls.experts.existingSecret }}
- name: expert-tls
  mountPath: /etc/moe-cluster/expert-tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "moe-cluster.modelPath" -}}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.path) }}
{{- end }}

{{/* model.source=image: copy the weights out of the weights image into the pod's emptyDir. */}}
{{- define "moe-cluster.modelInitContainers" -}}
{{- if eq .Values.model.source "image" }}
- name: copy-model
  image: {{ include "moe-cluster.image" (dict "root" . "image" .Values.model.image) | quote }}
  imagePullPolicy: {{ include "moe-cluster.pullPolicy" .Values.model.image }}
  command:
    - cp
    - -R
    - {{ printf "%s/." (trimSuffix "/" .Values.model.image.sourceDir) | quote }}
    - /model-copy/
  securityContext:
    {{- include "moe-cluster.containerSecurityContext" . | trim | nindent 4 }}
  resources:
    {{- toYaml .Values.model.image.resources | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: /model-copy
{{- end }}
{{- end }}

{{/* Extended resources of one expert group: its GPUs (if any) and its extra resources. */}}
{{- define "moe-cluster.groupResources" -}}
{{- $root := index . 0 }}
{{- $group := index . 1 }}
{{- $amounts := dict "cpu" (toString $group.cpus) "memory" $group.memory }}
{{- if gt (int $group.gpusPerPod) 0 }}
{{- $_ := set $amounts $root.Values.experts.gpuResourceName (toString $group.gpusPerPod) }}
{{- end }}
{{- range $name, $amount := $group.resources }}
{{- $_ := set $amounts $name (toString $amount) }}
{{- end }}
requests:
  {{- toYaml $amounts | nindent 2 }}
limits:
  {{- toYaml $amounts | nindent 2 }}
{{- end }}

{{/* "ray start" parameters as KubeRay's rayStartParams (a map of strings). Call with (list $ "head"|"worker" $group). */}}
{{- define "moe-cluster.rayStartParams" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $group := index . 2 }}
{{- $ray := $root.Values.ray }}
{{- $params := dict
  "node-manager-port" (toString $ray.nodeManagerPort)
  "object-manager-port" (toString $ray.objectManagerPort)
  "metrics-export-port" (toString $ray.metricsPort)
  "object-store-memory" (toString (int64 $ray.objectStoreMemoryBytes))
  "disable-usage-stats" "true" }}
{{- if eq $role "head" }}
{{- $_ := set $params "port" (toString $ray.gcsPort) }}
{{- $_ := set $params "num-cpus" "0" }}
{{- $_ := set $params "num-gpus" "0" }}
{{- $_ := set $params "include-dashboard" "false" }}
{{- else }}
{{- $_ := set $params "num-cpus" (toString $group.cpus) }}
{{- $_ := set $params "num-gpus" (toString $group.gpusPerPod) }}
{{- end }}
{{- range $key, $value := $group.rayStartParams }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
The one pod spec of every Ray node: the head and each expert worker group, in KubeRay's
RayCluster and in the standalone Deployments alike. Call with
(dict "root" $ "role" "head"|"worker" "group" $group). KubeRay writes the "ray start" command
itself from rayStartParams; standalone pods run the same parameters as their command.
*/}}
{{- define "moe-cluster.rayPodSpec" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $values := $root.Values }}
{{- $isHead := eq .role "head" }}
serviceAccountName: {{ include "moe-cluster.serviceAccountName" $root | quote }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with (include "moe-cluster.imagePullSecrets" $root | trim) }}
{{ . }}
{{- end }}
securityContext:
  {{- include "moe-cluster.podSecurityContext" $root | trim | nindent 2 }}
{{- with $group.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not $isHead }}
{{- with (include "moe-cluster.modelInitContainers" $root | trim) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}
containers:
  - name: {{ ternary "ray-head" "ray-worker" $isHead }}
    image: {{ include "moe-cluster.image" (dict "root" $root "image" $values.image) | quote }}
    imagePullPolicy: {{ include "moe-cluster.pullPolicy" $values.image }}
    {{- if eq $values.ray.mode "standalone" }}
    command:
      - ray
      - start
      - --block
      {{- if $isHead }}
      - --head
      {{- else }}
      - {{ printf "--address=%s" (include "moe-cluster.rayAddress" $root) | quote }}
      {{- end }}
      {{- range $key, $value := (include "moe-cluster.rayStartParams" (list $root .role $group) | fromYaml) }}
      {{- if and (eq $value "true") (has $key (list "disable-usage-stats" "no-redirect-output" "ray-debugger-external" "enable-resource-isolation")) }}
      - {{ printf "--%s" $key | quote }}
      {{- else }}
      - {{ printf "--%s=%s" $key $value | quote }}
      {{- end }}
      {{- end }}
    {{- end }}
    env:
      {{- include "moe-cluster.env" $root | trim | nindent 6 }}
    ports:
      {{- if $isHead }}
      - name: gcs-server
        containerPort: {{ $values.ray.gcsPort }}
        protocol: TCP
      {{- end }}
      - name: raylet
        containerPort: {{ $values.ray.nodeManagerPort }}
        protocol: TCP
      - name: metrics
        containerPort: {{ $values.ray.metricsPort }}
        protocol: TCP
    {{- /* The GCS (head) or the raylet (every node) accepts connections: the Ray processes are up.
    "ray start --block" exits when one of them dies, which restarts the container. */}}
    readinessProbe:
      tcpSocket:
        port: {{ ternary $values.ray.gcsPort $values.ray.nodeManagerPort $isHead }}
      periodSeconds: 10
      failureThreshold: 3
    livenessProbe:
      tcpSocket:
        port: {{ ternary $values.ray.gcsPort $values.ray.nodeManagerPort $isHead }}
      initialDelaySeconds: 30
      periodSeconds: 15
      failureThreshold: 4
    resources:
      {{- if $isHead }}
      {{- toYaml $group.resources | nindent 6 }}
      {{- else }}
      {{- include "moe-cluster.groupResources" (list $root $group) | trim | nindent 6 }}
      {{- end }}
    securityContext:
      {{- include "moe-cluster.containerSecurityContext" $root | trim | nindent 6 }}
    volumeMounts:
      {{- include "moe-cluster.baseVolumeMounts" $root | trim | nindent 6 }}
      {{- if not $isHead }}
      {{- include "moe-cluster.modelVolumeMount" $root | trim | nindent 6 }}
      {{- end }}
volumes:
  {{- include "moe-cluster.baseVolumes" $root | trim | nindent 2 }}
  {{- if not $isHead }}
  {{- include "moe-cluster.modelVolume" $root | trim | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Labels of the pods of one Ray role. Call with (list $ "head"|"worker" $group). */}}
{{- define "moe-cluster.rayPodLabels" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- include "moe-cluster.componentLabels" (list $root (printf "ray-%s" $role)) }}
{{- if eq $role "worker" }}
moe-cluster/expert-group: {{ (index . 2).name | quote }}
{{- end }}
{{- end }}

{{/* Volume mounts of both containers of the `helm test` pod. */}}
{{- define "moe-cluster.helmTestMounts" -}}
- name: scratch
  mountPath: /tmp
- name: script
  mountPath: /etc/moe-cluster/helm-test
  readOnly: true
{{- if .Values.tls.enabled }}
- name: test-ca
  mountPath: /etc/moe-cluster/test-ca
  readOnly: true
{{- if .Values.tls.test.clientSecret }}
- name: test-client
  mountPath: /etc/moe-cluster/test-client
  readOnly: true
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /etc/moe-cluster/auth
  readOnly: true
{{- end }}
{{- end }}

{{/* experts.groups with every optional key filled in (a list given in values replaces the default
one whole, so entries may leave keys out). Use as (include "moe-cluster.expertGroups" . | fromYamlArray). */}}
{{- define "moe-cluster.expertGroups" -}}
{{- $groups := list }}
{{- range $group := .Values.experts.groups }}
{{- $defaults := dict "minReplicas" $group.replicas "maxReplicas" $group.replicas "gpusPerPod" 0
  "resources" (dict) "nodeSelector" (dict) "tolerations" (list) "affinity" (dict)
  "priorityClassName" "" "rayStartParams" (dict) }}
{{- $groups = append $groups (merge (deepCopy $group) $defaults) }}
{{- end }}
{{- toYaml $groups }}
{{- end }}
