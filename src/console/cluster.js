// What the broker view shows of `GET /cluster` (root only): standalone, or
// this broker's view of the cluster with each broker's lag behind the
// newest token-bucket revision any of them has applied. Pure, so it is
// tested in Node.

/**
 * `{mode: 'standalone'}`, or `{mode: 'cluster', nodeId, stale, pending,
 * newest, nodes: [{nodeId, applied, lag, lastHeartbeat, stale, self}]}`,
 * this broker first, then by node id.
 */
export function clusterView(status) {
  if (!status || status.mode !== 'cluster') return { mode: 'standalone' };
  const listed = status.nodes || [];
  const newest = Math.max(status.applied, ...listed.map((n) => n.applied));
  const self = listed.find((n) => n.nodeId === status.nodeId);
  const nodes = [
    { nodeId: status.nodeId, applied: status.applied, lastHeartbeat: self ? self.lastHeartbeat : null, stale: status.stale, self: true },
    ...listed.filter((n) => n.nodeId !== status.nodeId).sort((a, b) => a.nodeId.localeCompare(b.nodeId))
      .map((n) => ({ nodeId: n.nodeId, applied: n.applied, lastHeartbeat: n.lastHeartbeat, stale: n.stale, self: false })),
  ].map((n) => ({ ...n, lag: newest - n.applied }));
  return { mode: 'cluster', nodeId: status.nodeId, stale: status.stale, pending: status.pendingChanges, newest, nodes };
}
