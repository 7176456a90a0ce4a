// The device list of an application from the devices API
// (`GET /applications/{app}/devices?limit=&cursor=`, `device.getState`):
// every device that has stored state, with first and last seen and the
// states it stored, in id order, a page at a time. A token limited to some
// devices lists only those (the server decides).

import { appPath } from './api.js';

/** Devices per page the devices view asks for. */
export const PAGE = 100;

/** One page: `{devices: [{device, firstSeen, lastSeen, messages}], next}` (times in ms). */
export async function devicePage(session, app, cursor = null, limit = PAGE) {
  const q = new URLSearchParams({ limit: String(limit) });
  if (cursor) q.set('cursor', cursor);
  const page = await session.get(`${appPath(app, 'devices')}?${q}`);
  return {
    devices: page.items.map((d) => ({
      device: d.device,
      firstSeen: Date.parse(d.firstSeenAt),
      lastSeen: Date.parse(d.lastSeenAt),
      messages: d.messages,
    })),
    next: page.next,
  };
}
